#!/usr/bin/env bash
# Create the host's virtual environment for the ComfyUI integration tests: .venv-comfyui at the
# repository root (ignored by git). Idempotent: a stamp file records what was installed, and a
# second run with the same inputs returns at once.
#
#   bash tools/setup_comfyui_env.sh            # create / update
#   FORCE=1 bash tools/setup_comfyui_env.sh    # reinstall everything
#
# Then: .venv-comfyui/bin/python -m pytest -m integration tests/integration
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY="${COMFYUI_DIR:-$ROOT/../shared/comfyui}"
VENV="${COMFYUI_VENV:-$ROOT/.venv-comfyui}"
PY="${PYTHON:-python3}"
TORCH_SET="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
STAMP="$VENV/.dreambooth-setup-stamp"
. "$ROOT/tools/venv_common.sh"

if [ ! -f "$COMFY/main.py" ]; then
    echo "ComfyUI source not found at $COMFY (set COMFYUI_DIR)" >&2
    exit 1
fi

# What the stamp records: any change re-runs the installs (pip then skips what is present).
want="$(printf '%s\n' "$TORCH_SET" "$(cat "$COMFY/requirements.txt")" requests pytest playwright "$(cat "$ROOT/install.py")" | sha256sum | cut -d' ' -f1)"
if venv_is_current "$STAMP" "$want" "$VENV"; then
    echo "$VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# 1. torch as a matching set (the registry's default build runs on CPU too). Installed first and
#    on its own so that later requirements never pull another torch.
install_torch_set "$VPY" "$TORCH_SET"

# 2. the host's own requirements, plus requests (imported by the host, not listed), pytest, and
#    playwright (the Python package only, driving the system Chromium for tools/screenshot_comfyui.py;
#    no browser is downloaded: never `playwright install`), keeping the torch set.
pip_keeping_torch "$VPY" "$TORCH_SET" -r "$COMFY/requirements.txt" requests pytest playwright

# 3. the pack's own needs, the way ComfyUI-Manager installs them.
"$VPY" "$ROOT/install.py"

echo "$want" > "$STAMP"
echo "ready: $VPY"
