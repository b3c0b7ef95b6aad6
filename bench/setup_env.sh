#!/usr/bin/env bash
# Create .venv-bench (ignored by git: `.venv-*/`) for `python -m bench`: ONE torch build shared by
# diffusers' reference DreamBooth script (which needs torchvision) and our trainer, so their
# speed and memory are compared on the same kernels. Idempotent (a stamp records what was
# installed; a second run with the same inputs returns at once).
#
#   bash bench/setup_env.sh            # create / update
#   FORCE=1 bash bench/setup_env.sh    # reinstall
#   .venv-bench/bin/python -m bench --quick
#
# torch 2.11.0 + torchvision 0.26.0 is the registry's default build (the same set as the ComfyUI
# host's .venv-comfyui); it runs on CPU as well as on CUDA. The registry's torchvision wheels
# match only that default torch build, so the core's CPU-only torch in .venv is not used here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PY="${PYTHON:-python3}"
TORCH_SET="torch==2.11.0 torchvision==0.26.0"
PACKAGES="diffusers>=0.40 transformers accelerate peft safetensors pillow numpy tqdm"
STAMP="$VENV/.bench-setup-stamp"
. "$ROOT/tools/venv_common.sh"
want="$(printf '%s\n' "$TORCH_SET" "$PACKAGES" "$(cat "$ROOT/pyproject.toml")" | sha256sum | cut -d' ' -f1)"
if venv_is_current "$STAMP" "$want" "$VENV"; then
    echo "$VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# torch first, as a matching set, which no later install may replace.
install_torch_set "$VPY" "$TORCH_SET"
# shellcheck disable=SC2086
pip_keeping_torch "$VPY" "$TORCH_SET" $PACKAGES
pip_keeping_torch "$VPY" "$TORCH_SET" -e "$ROOT"
"$VPY" -c "import torch, torchvision, diffusers, peft, dreambooth_core; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'diffusers', diffusers.__version__)"
echo "$want" > "$STAMP"
echo "ready: $VPY"
