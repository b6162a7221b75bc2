"""`make gpu-check` (tools/gpu_check.py): its skip path without CUDA, its plan and its verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from script_loading import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT)


def test_without_cuda_it_says_why_it_skipped_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run, not skip")
    out = tmp_path / "reports"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "GPU CHECK: SKIPPED, no CUDA device: torch.cuda.is_available() is False" in done.stdout
    assert not out.exists()  # nothing ran


def test_plan_runs_the_matrix_under_the_gpu_profile_and_tp2_and_the_draft_worker_only_with_two_gpus(gpu_check, tmp_path):
    one = gpu_check.plan(1, tmp_path)
    assert [step.name for step in one] == ["kernels", "lossless-matrix", "deployment", "benchmark",
                                           "target-attention-benchmark"]
    assert one[0].env == {"HIPPO_KERNEL_TEST_DEVICE": "cuda"}
    assert one[1].env == one[2].env == {"HIPPO_TEST_PROFILE": "gpu", "HIPPO_TEST_TP": "1"}
    assert "--production" in one[3].command
    assert one[4].command[1:4] == ["benchmarks/bench_target_attention.py", "--device", "cuda"]
    two = gpu_check.plan(2, tmp_path)
    assert [step.name for step in two] == ["kernels", "lossless-matrix", "deployment", "tensor-parallel-2",
                                           "draft-worker-gpu", "benchmark", "target-attention-benchmark"]
    assert two[3].env["HIPPO_TEST_TP"] == "2"
    assert two[4].env == {"HIPPO_TEST_PROFILE": "gpu", "HIPPO_TEST_TP": "1"}
    for selection in (*gpu_check.LOSSLESS_MATRIX, *gpu_check.DEPLOYMENT_TESTS, *gpu_check.TENSOR_PARALLEL_TESTS,
                      *gpu_check.DRAFT_WORKER_TESTS, *gpu_check.KERNEL_TESTS):
        path, _, test = selection.partition("::")
        assert (ROOT / path).exists(), path
        assert not test or f"def {test}(" in (ROOT / path).read_text(), selection


def test_verdict_names_every_failed_step_and_test(gpu_check, tmp_path):
    report = tmp_path / "lossless-matrix.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.vllm.test_hippo_lossless" name="test_a[serial-gpu]"/>'
        '<testcase classname="tests.vllm.test_hippo_lossless" name="test_b[vpsd-gpu]"><failure message="x"/></testcase>'
        '<testcase classname="tests.server.test_openai_server" name="test_c"><error message="y"/></testcase>'
        "</testsuite></testsuites>")
    _, matrix, _, bench, _ = gpu_check.plan(1, tmp_path)
    failed = gpu_check.failed_tests(report)
    assert failed == ("tests.vllm.test_hippo_lossless::test_b[vpsd-gpu]", "tests.server.test_openai_server::test_c")

    passed, text = gpu_check.verdict([gpu_check.Outcome(matrix, 0), gpu_check.Outcome(bench, 0)])
    assert passed and text == "GPU CHECK: PASS (lossless-matrix, benchmark)"
    passed, text = gpu_check.verdict([gpu_check.Outcome(matrix, 1, failed), gpu_check.Outcome(bench, 1)])
    assert not passed
    assert text.splitlines() == [
        "GPU CHECK: FAIL",
        "  lossless-matrix: exit code 1",
        "    tests.vllm.test_hippo_lossless::test_b[vpsd-gpu]",
        "    tests.server.test_openai_server::test_c",
        "  benchmark: exit code 1",
    ]
