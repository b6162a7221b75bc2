"""The three CPU environment fixes applied by tools/setup_env.sh hold in this venv."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

VENV_BIN = pathlib.Path(sys.executable).parent
CPU_TORCH = importlib.util.find_spec("torch") is not None and __import__("torch").version.cuda is None

pytestmark = pytest.mark.skipif(not CPU_TORCH, reason="the fixes apply to CPU torch only")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_torchvision_and_the_qwen_video_processor_import_in_a_fresh_interpreter():
    out = _run(
        "import torchvision, torch\n"
        "from transformers import Qwen2VLVideoProcessor\n"
        "boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1.0], [2, 2, 3, 3]])\n"
        "print(torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())\n"
    )
    assert out.returncode == 0, out.stderr
    # The fallback kernel (or a real extension) suppresses the duplicate box.
    assert out.stdout.strip().splitlines()[-1] == "[0, 2]"


def test_cuda_only_audio_packages_are_absent():
    assert importlib.util.find_spec("torchaudio") is None
    assert importlib.util.find_spec("torchcodec") is None


def test_vllm_console_script_reports_the_cpu_version():
    out = subprocess.run([str(VENV_BIN / "vllm"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith("+cpu")
