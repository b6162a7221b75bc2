"""The documentation's tables that repeat the code are the code's rendering, and its
`make` commands exist."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import render_readme_tables  # noqa: E402


def test_every_table_is_marked_somewhere():
    marked = [name for path in render_readme_tables.documents() for name in
              render_readme_tables.tables_in(path.read_text())]
    assert sorted(set(marked)) == sorted(render_readme_tables.TABLES)


def test_marked_tables_equal_their_rendering_from_the_code():
    stale = render_readme_tables.stale()
    assert not stale, (f"tables differ from the code in {[str(p.relative_to(ROOT)) for p in stale]}; "
                       "run `python tools/render_readme_tables.py --write`")


def test_a_changed_default_or_new_metric_is_caught(monkeypatch):
    """The check reads the code at run time: a drifted default or metric name shows."""
    from hippo_vllm.vllm.metrics import stats

    readme = (ROOT / "README.md").read_text()
    assert render_readme_tables.render(readme) == readme
    monkeypatch.setitem(stats.EXPORTED_STATS, "new_counter", "A counter the README lacks.")
    assert "`vllm:hippo_new_counter_total`" in render_readme_tables.render(readme)


def test_a_key_without_a_meaning_is_refused(monkeypatch):
    from hippo_vllm import config

    monkeypatch.delitem(config.KEY_MEANINGS, "crop_size")
    with pytest.raises(SystemExit, match="crop_size"):
        render_readme_tables.hippo_config()


def test_documented_make_commands_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for path in render_readme_tables.documents():
        for target in re.findall(r"`make ([\w-]+)", path.read_text()):
            assert target in targets, f"{path.name} names `make {target}`, which the Makefile lacks"
