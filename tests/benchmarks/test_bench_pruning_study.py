"""The pruning study: a tiny real run checks losslessness, drafting and every reported field.

The figures themselves are not asserted (random-weight models): only that they are
there, in range, and that the draft-answer reader reads what the draft would answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_loading import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pruning_study.py"
QUICK_ROWS = ["holistic 0.1", "none", "no video", "holistic no attn"]
ROW_KEYS = {"name", "group", "method", "keep_ratio", "acceptance_rate", "mat_serial", "mat_parallel",
            "tokens_per_target_forward_parallel", "draft_accuracy", "draft_same_as_target",
            "boundary_selection_ratio", "boundary_share", "object_token_recall", "video_share_seen",
            "lossless", "drafted_tokens", "by_kind", "runs"}
PLOTS = ("pruning_study_mat.png", "pruning_study_boundary.png", "pruning_study_kept_tokens.png")


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


@pytest.fixture(scope="module")
def measures():
    """The module of the study's figures, beside the script."""
    return load_script(BENCH.parent / "pruning_study_measures.py")


def test_an_answer_is_correct_when_its_first_sentence_is_the_expected_one(measures):
    assert measures.is_correct("It is  Blue. It is blue", "It is blue.")
    assert not measures.is_correct("It is blue", "It is red.")
    assert not measures.is_correct("It is bluegreen.", "It is blue.")
    description = "There are two objects. The red bar moves left from top left. A blue pole stays at top right."
    assert measures.is_correct(description.replace(". ", ".  "), description)
    assert not measures.is_correct("There are two objects. The red bar moves left from top left.", description)


def test_the_full_study_runs_both_schedules_except_for_ablations(bench):
    variants = bench.build_variants(bench.METHODS, bench.KEEP_RATIOS, tuple(bench.ABLATIONS), ("none", "no video"))
    grid = [v for v in variants if v.group == "grid"]
    assert len(grid) == len(bench.METHODS) * len(bench.KEEP_RATIOS)
    assert all(v.schedules == ("serial", "parallel") for v in variants if v.group != "ablation")
    assert all(v.schedules == ("serial",) for v in variants if v.group == "ablation")
    no_video = next(v for v in variants if v.name == "no video")
    assert no_video.keys == {"keep_ratio": 0.0}


def test_object_tokens_are_the_merged_patches_the_object_covers(bench, measures):
    import numpy as np

    from hippo_vllm.core import VideoGrid

    masks = np.zeros((4, 112, 112), dtype=np.int8)
    masks[1, 30:33, 60:62] = 1  # frame 1 -> token frame 0; rows 28-55 -> 1; columns 56-83 -> 2
    question = bench.Question(0, "small_mover", "color", "q", "a", "v.mp4", None, masks, (1,))
    cells = measures.object_token_mask(question, VideoGrid(2, 4, 4))
    assert cells.nonzero().flatten().tolist() == [0 * 16 + 1 * 4 + 2]
    assert measures.object_token_mask(question, VideoGrid(3, 4, 4)) is None  # frames do not map onto the grid


@pytest.mark.engine
def test_quick_study_is_lossless_drafts_and_reports_every_field(bench, tmp_path, monkeypatch):
    checked = []  # (row and schedule, outputs, reference) of every lossless check
    check = bench.check_lossless

    def recording_check(name, ids, reference):
        checked.append((name, ids, reference))
        check(name, ids, reference)

    monkeypatch.setattr(bench, "check_lossless", recording_check)
    out = tmp_path / "study.json"
    # The target drafts for itself: with the whole video, its own answers must come back.
    bench.main(["--quick", "--pair", "self", "--methods", "holistic", "--out", str(out)])
    result = json.loads(out.read_text())

    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == QUICK_ROWS
    num_questions = result["settings"]["num_questions"]
    assert num_questions == len(result["questions"]) == len(result["target"]["texts"]) >= 3
    assert result["claim_tested"] is False and result["note"]

    # Every engine's outputs were compared with the target alone's, and drafting happened in each.
    expected = [f"{name} ({schedule})" for name in QUICK_ROWS for schedule in rows[name]["runs"]]
    assert [name for name, _, _ in checked] == expected
    reference = checked[0][2]
    assert len(reference) == num_questions and all(ref == reference for *_, ref in checked)
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["lossless"] is True
        assert set(row["runs"]) == ({"serial"} if row["group"] == "ablation" else {"serial", "parallel"})
        assert all(count > 0 for count in row["drafted_tokens"].values()), name
        assert 0 <= row["acceptance_rate"] <= 1 and 0 <= row["draft_accuracy"] <= 1
        assert 1 <= row["mat_serial"] <= result["settings"]["k"] + 1
        if row["group"] != "ablation":
            assert row["mat_parallel"] >= 1  # PEARL runs span rounds: no upper bound of k
            assert row["tokens_per_target_forward_parallel"] >= 1
        assert set(row["by_kind"]) == {q["kind"] for q in result["questions"]}
        assert all({"draft_accuracy", "boundary_share", "object_token_recall"} <= set(figures)
                   for figures in row["by_kind"].values())
        selection = row["runs"]["serial"]["selection"]
        assert len(selection["kept"]) == num_questions
        assert len(row["runs"]["serial"]["draft_answers"]["texts"]) == num_questions

    # What the draft saw: about 10%, everything, nothing.
    t, h, w = rows["holistic 0.1"]["runs"]["serial"]["selection"]["grid"]
    assert rows["holistic 0.1"]["video_share_seen"] == pytest.approx(-(-0.1 * t * h * w // 1) / (t * h * w))
    assert rows["none"]["video_share_seen"] == 1.0 and rows["none"]["boundary_selection_ratio"] == 1.0
    assert rows["no video"]["video_share_seen"] == 0.0
    assert rows["no video"]["boundary_selection_ratio"] is None and rows["no video"]["object_token_recall"] == 0.0
    for name in ("holistic 0.1", "holistic no attn"):
        assert rows[name]["boundary_selection_ratio"] > 0 and 0 <= rows[name]["object_token_recall"] <= 1
    # The reader of the draft's answers reads the draft: the target seeing the whole video
    # answers as the target, and accepts (nearly) all its drafts.
    assert rows["none"]["draft_same_as_target"] == 1.0
    assert rows["none"]["acceptance_rate"] > 0.9

    for name in PLOTS:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
