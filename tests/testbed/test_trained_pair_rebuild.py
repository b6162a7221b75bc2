"""The shipped trained weights are what the recipe trains, and belong to the current recipe.

The rebuild is opt-in (HIPPO_TEST_REBUILD_TRAINED_PAIR=1, or `make test-trained-rebuild`):
it trains both models of each shipped pair from its recipe, about a quarter of an hour a pair.
"""

from __future__ import annotations

import json
import os

import pytest

from hippo_testbed import shipped_pair, trained_pair


@pytest.mark.parametrize("merge", trained_pair.MERGE_SIZES, ids=lambda merge: f"merge{merge}")
def test_the_repository_ships_weights_for_the_current_recipe(merge):
    """A change to the task, the sizes or the training settings must ship new weights
    (`python -m hippo_testbed --ship-trained-pair [--merge-size N]`), or every user would
    train for minutes."""
    recipe = trained_pair.recipe(merge)
    root = shipped_pair.shipped_root(recipe)
    assert root is not None, (f"no shipped weights {shipped_pair.shipped_key(recipe)} under "
                              f"{shipped_pair.SHIPPED_DIR}; run python -m hippo_testbed --ship-trained-pair "
                              f"--merge-size {merge}")
    shipped = json.loads((root / "recipe.json").read_text())
    assert shipped_pair.shipped_recipe(shipped) == json.loads(json.dumps(shipped_pair.shipped_recipe(recipe),
                                                                         default=list))
    for model in ("target", "draft"):
        assert (root / model / "model.safetensors").stat().st_size < 8 * 2**20


@pytest.mark.skipif(os.environ.get("HIPPO_TEST_REBUILD_TRAINED_PAIR") != "1",
                    reason="trains the pair (a quarter of an hour); HIPPO_TEST_REBUILD_TRAINED_PAIR=1 or "
                           "`make test-trained-rebuild` runs it")
@pytest.mark.parametrize("merge", trained_pair.MERGE_SIZES, ids=lambda merge: f"merge{merge}")
def test_training_from_the_recipe_gives_the_shipped_weights(tmp_path, merge):
    from safetensors.torch import load_file

    recipe = trained_pair.recipe(merge)
    root = shipped_pair.shipped_root(recipe)
    assert root is not None
    libraries = json.loads((root / "recipe.json").read_text())["libraries"]
    trained_pair.write_trained_pair(tmp_path / "trained", merge_size=merge)
    shipped_pair.materialize(root, tmp_path / "shipped", trained_pair.COST_PADDING_LAYERS)
    exact = libraries == recipe["libraries"]  # other library versions may round differently
    for model in ("target", "draft"):
        trained = load_file(str(tmp_path / "trained" / model / "model.safetensors"))
        shipped = load_file(str(tmp_path / "shipped" / model / "model.safetensors"))
        assert trained.keys() == shipped.keys(), model
        for name, tensor in trained.items():
            if exact:
                assert tensor.equal(shipped[name]), f"{model} {name} differs from the shipped weights"
            else:
                assert tensor.allclose(shipped[name], atol=1e-4), f"{model} {name}; built with {libraries}"
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            assert ((tmp_path / "trained" / model / name).read_text()
                    == (tmp_path / "shipped" / model / name).read_text()), f"{model} {name}"
