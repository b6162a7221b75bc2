"""The end-to-end benchmark: a tiny real run checks every output, drafts, and reports its columns.

No timing assertions: wall times on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_loading import load_script

from hippo_testbed.families import FAMILY_FIXTURES

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_e2e.py"
REPORT = BENCH.with_name("e2e_report.py")
ROWS = ["target", "draft_model text", "hippo serial tiny", "hippo parallel tiny"]
# With two cores: the target bound to core 0, alone, with the draft beside it (draft-then-verify)
# and with the draft in a worker on core 1 (chunks of γ, and of PEARL's adaptive length).
WORKER_ROWS = ["target core0", "hippo serial tiny core0", "hippo parallel tiny worker",
               "hippo parallel tiny worker adaptive"]
COLUMNS = ("configuration", "wall s", "tok/s", "fwd", "tok/fwd", "MAT", "video seen", "target s", "draft s",
           "host/step")
ROW_KEYS = {"name", "workload", "wall_seconds", "tokens_per_second", "generated_tokens", "target_forwards",
            "tokens_per_target_forward", "mat", "spec_acceptance_rate", "video_tokens_seen",
            "video_tokens_total", "seconds", "lossless", "speedup_vs_target", "host_ms_per_target_step"}


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_a_differing_output_aborts_the_benchmark(bench):
    bench.check_lossless("same", 0, [[1, 2, 3]], [[1, 2, 3]])
    with pytest.raises(SystemExit, match=r"hippo serial tiny, batch 1, prompt 1 differs .* at token 2"):
        bench.check_lossless("hippo serial tiny", 1, [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]])


def test_a_family_without_tiny_fixtures_or_a_trained_pair_of_another_family_is_refused(bench, capsys):
    for argv in (["--family", "Gemma"], ["--models", "trained", "--family", "Qwen2-VL"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    errors = capsys.readouterr().err
    assert f"--family must be one of {sorted(FAMILY_FIXTURES)}, got 'Gemma'" in errors
    assert "--models trained is a Qwen2.5-VL pair; --family 'Qwen2-VL' runs on --models tiny" in errors


def test_trained_models_run_description_and_template_workloads_at_each_batch_size(bench, capsys):
    args = bench.parse_args(["--models", "trained"])
    assert (args.questions, args.batch_sizes, args.num_prompts) == (["describe", "template"], [1, 8], 8)
    assert args.max_tokens == bench.DESCRIBE_MAX_TOKENS
    assert bench.parse_args(["--models", "trained", "--quick"]).batch_sizes == [1]
    assert args.merge_size == 2 and bench.parse_args(["--models", "trained", "--merge-size", "1"]).merge_size == 1
    for argv in (["--models", "trained", "--questions", "summary"], ["--models", "trained", "--batch-sizes", "0"],
                 ["--batch-sizes", "1,8"], ["--models", "trained", "--merge-size", "4"], ["--merge-size", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    errors = capsys.readouterr().err
    assert "--questions must list 'describe' and/or 'template', got ['summary']" in errors
    assert "--batch-sizes must be >= 1, got [0]" in errors
    assert "--batch-sizes, --fresh-videos and --merge-size are for --models trained" in errors
    assert "--merge-size must be one of (2, 1), got 4" in errors


def test_fresh_videos_give_every_batch_of_every_workload_videos_of_its_own(bench, tiny_tokenizer, tmp_path,
                                                                          capsys):
    args = bench.parse_args(["--models", "trained", "--fresh-videos", "--repeats", "2", "--batch-sizes", "1,2",
                             "--questions", "describe"])
    workloads = bench.task_workloads(tiny_tokenizer, args, tmp_path)
    batches = [w.batch(repeat) for w in workloads for repeat in range(args.repeats + 1)]
    assert [len(b) for b in batches] == [1, 1, 1, 2, 2, 2]
    clips = [r["multi_modal_data"]["video"][0].tobytes() for b in batches for r in b]
    assert len(set(clips)) == len(clips) == 9
    # Without the flag every batch repeats the workload's prompts.
    same = bench.task_workloads(tiny_tokenizer, bench.parse_args(["--models", "trained", "--batch-sizes", "1",
                                                                  "--questions", "describe"]), tmp_path)[0]
    assert same.batch(0) is same.batch(3) is same.requests
    with pytest.raises(SystemExit):
        bench.parse_args(["--fresh-videos"])
    assert "--fresh-videos and --merge-size are for --models trained" in capsys.readouterr().err


def test_fresh_video_rows_compare_all_their_batches_and_others_their_median(bench):
    target = {"fresh_videos": True, "wall_seconds": 1.0, "wall_seconds_all": [1.0, 3.0, 2.0]}
    row = {"fresh_videos": True, "wall_seconds": 0.5, "wall_seconds_all": [0.5, 1.0, 1.5]}
    assert bench.times_faster(target, row) == pytest.approx(6.0 / 3.0)
    assert bench.times_faster({**target, "fresh_videos": False}, {**row, "fresh_videos": False}) == 2.0


def test_timings_are_flagged_by_spread_or_idle_cores_counting_only_the_cores_a_row_may_use():
    report = load_script(REPORT)
    steady = {"name": "r", "fresh_videos": False, "wall_seconds_all": [1.0, 1.2], "cores_busy": 1.95,
              "cores_allowed": 2}
    assert report.timing_warning(steady, top_share=0.98) is None
    one_core = {**steady, "cores_busy": 0.99, "cores_allowed": 1}  # bound to one core, busy on it
    assert report.timing_warning(one_core, top_share=0.98) is None
    starved = {**steady, "cores_busy": 1.2}
    assert "1.20 of its 2 cores busy" in report.timing_warning(starved, top_share=0.98)
    spread = {**steady, "wall_seconds_all": [1.0, 1.6]}
    assert report.timing_warning(spread, top_share=0.98).startswith("WARNING: 'r' batches took 1.000-1.600 s")
    assert report.timing_warning({**spread, "fresh_videos": True}, top_share=0.98) is None


def test_interleaved_rows_run_each_batch_in_every_row_the_target_first_the_others_rotating(bench, monkeypatch,
                                                                                           capsys):
    ran, closed = [], []

    class Recorded:  # bench_e2e.EngineRun's interface: the order of its calls is what is tested
        def __init__(self, config, args, settings, check):
            self.name = config.name

        def start(self, workload):
            self.workload = workload.name

        def run_batch(self, repeat, references):
            ran.append((self.workload, repeat, self.name))

        def finish(self):
            return {"workload": self.workload, "name": self.name}

        def close(self):
            closed.append(self.name)

    monkeypatch.setattr(bench, "EngineRun", Recorded)
    configs = [bench.Config(name, "hippo") for name in ("target", "a", "b", "c")]
    workloads = [bench.Workload(name, [], 4) for name in ("w1", "w2")]
    args = bench.parse_args(["--repeats", "3", "--no-worker", "--interleave"])
    rows = bench.run_interleaved(configs, workloads, args, {})
    orders = [[name for w, r, name in ran if (w, r) == (workload, repeat)]
              for workload in ("w1", "w2") for repeat in range(4)]
    assert orders == [["target", "a", "b", "c"], ["target", "b", "c", "a"], ["target", "c", "a", "b"],
                      ["target", "a", "b", "c"]] * 2
    assert [(row["workload"], row["name"]) for row in rows] == [(w, c.name) for w in ("w1", "w2") for c in configs]
    assert closed == ["target", "a", "b", "c"]
    # Every engine runs at once on all cores: not with the rows bound to one core, nor under py-spy.
    for argv in (["--interleave"], ["--interleave", "--no-worker", "--profile", "prof"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "--interleave runs every row's engine at once on all cores: add --no-worker" in capsys.readouterr().err


def test_production_settings_are_what_a_gpu_user_runs(bench):
    production = bench.engine_settings(bench.parse_args(["--quick", "--production"]))
    assert (production["dtype"], production["enforce_eager"]) == ("bfloat16", False)
    assert "kv_cache_memory_bytes" not in production
    fast = bench.engine_settings(bench.parse_args(["--quick"]))
    assert (fast["dtype"], fast["enforce_eager"]) == ("float32", True)


# On Qwen3-VL, the family whose video prompts differ most from Qwen2.5-VL's (timestamps
# between the frames, DeepStack): the benchmark runs any family's tiny pair.
@pytest.mark.engine
def test_quick_run_compares_every_batch_with_the_target_and_drafts(bench, tiny, tmp_path, monkeypatch, capsys):
    checked = []  # (row, batch, outputs, reference) of every lossless check the benchmark makes
    check = bench.check_lossless

    def recording_check(name, repeat, ids, reference):
        checked.append((name, repeat, ids, reference))
        check(name, repeat, ids, reference)

    monkeypatch.setattr(bench, "check_lossless", recording_check)
    out = tmp_path / "e2e.json"
    bench.main(["--quick", "--pairs", "tiny", "--max-tokens", "8", "--family", "Qwen3-VL", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["target"] == str(tiny.qwen3_vl_target)
    expected = ROWS + (WORKER_ROWS if result["settings"]["worker_rows"] else [])
    printed = capsys.readouterr().out
    num_prompts, max_tokens = result["settings"]["num_prompts"], result["settings"]["max_tokens"]

    # Every batch of every row (warm-up + 1 timed) was compared with the target's own outputs.
    assert [(name, repeat) for name, repeat, _, _ in checked] == [(f"{row} (tiny)", r) for row in expected
                                                                  for r in (0, 1)]
    target_ids = checked[0][2]
    assert len(target_ids) == num_prompts and all(len(ids) == max_tokens for ids in target_ids)
    assert all(reference == target_ids for *_, reference in checked)

    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == expected
    for row in rows.values():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["lossless"] == {"checked_batches": 2, "checked_outputs": 2 * num_prompts, "equal_to_target": True}
        assert row["generated_tokens"] == max_tokens * num_prompts
        assert row["target_forwards"] > 0 and row["wall_seconds"] > 0
        # The forwards ran inside the timed wrappers; the host time is the rest of the wall time.
        assert 0 < row["seconds"]["forwards"] < row["wall_seconds"] and row["host_ms_per_target_step"] > 0
        # The engine's steps hold part of the host time; the requests' rendering before them the rest.
        steps = row["batched_target_steps"]
        assert 0 < row["host_ms_per_engine_step"] * steps < row["host_ms_per_request"] * num_prompts
    # Drafting happened in every speculative row, counted at vLLM's scheduler and by hippo.
    for name in ROWS[1:]:
        assert rows[name]["tracker"]["spec_drafted"] > 0, name
    for name in ("hippo serial tiny", "hippo parallel tiny"):
        assert rows[name]["speculative_config"]["model"] == str(tiny.qwen3_vl_draft)
        assert rows[name]["tracker"]["hippo"]["draft_tokens"] > 0, name
        assert 0 < rows[name]["video_tokens_seen"] < rows[name]["video_tokens_total"]
    assert rows["draft_model text"]["video_tokens_seen"] == 0
    assert rows["target"]["tracker"]["spec_drafted"] == 0
    assert rows["hippo parallel tiny"]["mat"] is not None
    if result["settings"]["worker_rows"]:
        for name in WORKER_ROWS[2:]:
            worker = rows[name]
            assert worker["tracker"]["spec_drafted"] > 0 and worker["worker"]["round_trips"] > 0, name
            assert worker["worker"]["overlap_efficiency"] > 0 and worker["worker"]["restarts"] == 0, name
        assert rows["hippo parallel tiny worker adaptive"]["speculative_config"]["draft_length"] == "adaptive"
        assert "overlap efficiency" in printed

    # The printed table has every column and one line per row.
    header = next(line for line in printed.splitlines() if line.startswith("configuration"))
    assert all(column in header for column in COLUMNS), header
    for name in expected:
        assert sum(line.startswith(f"{name:<28} ") for line in printed.splitlines()) == 1, name


def test_text_only_checkpoint_is_the_vl_language_model_on_text(bench, tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    text_dir = load_script(BENCH.parent / "e2e_workloads.py").text_only_checkpoint(tiny.draft, tmp_path / "text_draft")
    text_model = AutoModelForCausalLM.from_pretrained(text_dir)
    assert type(text_model).__name__ == "Qwen2ForCausalLM"
    vl_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny.draft)
    ids = torch.tensor([[480, 17, 230, 99, 5, 311, 42]])
    with torch.no_grad():
        torch.testing.assert_close(text_model(ids).logits, vl_model(ids).logits, rtol=1e-5, atol=1e-5)
