"""Check hippo_vllm on this machine's NVIDIA GPUs at the settings users run: `make gpu-check`.

Runs, on the tiny offline fixtures:

0. the s_attn kernel's tests on CUDA (tests/ops/, against the torch oracle: shapes, GQA,
   bf16/fp16/fp32, fp8 keys, every cache layout, poisoned caches and outputs), which
   also fail when the CUDA kernel was not built;
1. the lossless matrix (both schedules; text, video, several videos, images, mixed
   batches, chunked prefill, prefix caching, preemption, stop strings, aborts,
   ablations, sampling statistics, top-k, metrics, the OpenAI server) under the test
   profile ``gpu`` (tests/engine_utils.py): bfloat16, torch.compile and CUDA graphs,
   vLLM's default attention backend and KV-cache sizing; with it the draft's measured
   working memory and its decode steps replayed from CUDA graphs against its eager
   forward (tests/vllm/test_draft_gpu_memory_and_graphs.py, step times printed);
2. what deployments add (tests/vllm/test_gpu_deployment.py): an engine at production
   sizes (0.9 of the memory, vLLM's default batch sizes and model length), an fp8 KV
   cache, a long video whose prefill is chunked, and a last prefill chunk of 1+K tokens
   that vLLM replays as a FULL CUDA graph (its view comes without the target's
   attention, counted, and the output stays lossless);
3. with two or more GPUs, the same engine at tensor-parallel size 2 against the
   target alone at that size, also after a fault switched drafting off on the output
   rank (tests/vllm/test_tensor_parallel_gpu.py), and the draft
   in a worker process on GPU 1 beside the target on GPU 0, both schedules
   (tests/vllm/test_draft_worker_gpu.py);
4. a short end-to-end benchmark at the same settings (benchmarks/bench_e2e.py
   --quick --production), which aborts unless every output equals the target's;
5. the s_attn benchmark (benchmarks/bench_target_attention.py --device cuda): kernel,
   torch path and floor per layer for the 7B and 72B geometries at 2k-64k video tokens;

then prints one verdict: PASS, or FAIL with the steps and tests that failed.
Without a CUDA device it prints why it skipped and exits 0.

Usage: python tools/gpu_check.py [--out DIR]   (logs, JUnit reports and the benchmark JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSLESS_MATRIX = (
    "tests/vllm/test_hippo_lossless.py",
    "tests/vllm/test_hippo_prompts.py",
    "tests/vllm/test_hippo_sampling.py",
    "tests/vllm/test_metrics.py",
    "tests/server/test_openai_server.py",
    "tests/server/test_top_k_server.py",
    "tests/vllm/test_empty_logits_guard.py::test_top_k_requests_complete_and_top_1_equals_greedy",
    "tests/vllm/test_gpu_worker_isolation.py",
    "tests/vllm/test_draft_kv_budget.py",
    "tests/vllm/test_compiled_target.py",
    "tests/vllm/test_family_matrix.py",
    "tests/vllm/test_draft_gpu_memory_and_graphs.py",
)
TENSOR_PARALLEL_TESTS = ("tests/vllm/test_tensor_parallel_gpu.py",)
DRAFT_WORKER_TESTS = ("tests/vllm/test_draft_worker_gpu.py",)
# Production sizes, fp8 KV, a long chunked video, a FULL-graph prefill chunk: its own
# process, since the production-size engine takes 0.9 of the GPU memory.
DEPLOYMENT_TESTS = ("tests/vllm/test_gpu_deployment.py",)
KERNEL_TESTS = ("tests/ops/",)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    env: dict[str, str]
    junit: Path | None = None  # pytest's report, read for the names of failed tests


@dataclasses.dataclass(frozen=True)
class Outcome:
    step: Step
    returncode: int
    failed_tests: tuple[str, ...] = ()


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices torch sees, why none when 0)."""
    try:
        import torch
    except ImportError as error:
        return 0, f"torch cannot be imported ({error})"
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
        return 0, f"torch.cuda.is_available() is False ({build})"
    return torch.cuda.device_count(), ""


def plan(num_gpus: int, out: Path) -> list[Step]:
    """The steps for a machine with ``num_gpus`` GPUs; reports and logs go to ``out``."""
    python, profile = sys.executable, {"HIPPO_TEST_PROFILE": "gpu", "HIPPO_TEST_TP": "1"}

    def pytest_step(name: str, paths: tuple[str, ...], env: dict[str, str]) -> Step:
        junit = out / f"{name}.xml"
        return Step(name, [python, "-m", "pytest", "-q", "-rfE", f"--junitxml={junit}", *paths], env, junit)

    steps = [pytest_step("kernels", KERNEL_TESTS, {"HIPPO_KERNEL_TEST_DEVICE": "cuda"}),
             pytest_step("lossless-matrix", LOSSLESS_MATRIX, profile),
             pytest_step("deployment", DEPLOYMENT_TESTS, profile)]
    if num_gpus >= 2:
        steps.append(pytest_step("tensor-parallel-2", TENSOR_PARALLEL_TESTS, {**profile, "HIPPO_TEST_TP": "2"}))
        steps.append(pytest_step("draft-worker-gpu", DRAFT_WORKER_TESTS, profile))
    steps.append(Step("benchmark", [python, "benchmarks/bench_e2e.py", "--quick", "--production",
                                    "--out", str(out / "bench_e2e.json")], {}))
    steps.append(Step("target-attention-benchmark", [python, "benchmarks/bench_target_attention.py", "--device",
                                                     "cuda", "--out", str(out / "target_attention.json")], {}))
    return steps


def failed_tests(junit: Path | None) -> tuple[str, ...]:
    """Names of the failed and errored tests in a JUnit report (none if it is missing)."""
    if junit is None or not junit.exists():
        return ()
    names = []
    for case in ElementTree.parse(junit).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"{case.get('classname')}::{case.get('name')}")
    return tuple(names)


def run(step: Step) -> Outcome:
    print(f"\n=== {step.name}: {' '.join(step.command)}", flush=True)
    # The checkout first on the path, so vLLM's subprocesses import this hippo_vllm too.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **step.env, "PYTHONPATH": path}
    returncode = subprocess.call(step.command, cwd=ROOT, env=env)
    return Outcome(step, returncode, failed_tests(step.junit))


def verdict(outcomes: list[Outcome]) -> tuple[bool, str]:
    """(passed, the text to print): PASS, or FAIL naming each failed step and test."""
    failed = [outcome for outcome in outcomes if outcome.returncode != 0]
    if not failed:
        return True, "GPU CHECK: PASS (" + ", ".join(outcome.step.name for outcome in outcomes) + ")"
    lines = ["GPU CHECK: FAIL"]
    for outcome in failed:
        lines.append(f"  {outcome.step.name}: exit code {outcome.returncode}")
        lines += [f"    {test}" for test in outcome.failed_tests]
    return False, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu_check",
                        help="folder for the JUnit reports and the benchmark JSON")
    args = parser.parse_args(argv)
    num_gpus, why_not = cuda_devices()
    if num_gpus == 0:
        print(f"GPU CHECK: SKIPPED, no CUDA device: {why_not}. It needs an NVIDIA GPU and the CUDA "
              "environment that tools/setup_env.sh builds where nvidia-smi works.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"GPU check on {num_gpus} CUDA device(s); reports in {args.out}")
    passed, text = verdict([run(step) for step in plan(num_gpus, args.out)])
    print("\n" + text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
