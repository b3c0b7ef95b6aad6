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

if [ ! -f "$COMFY/main.py" ]; then
    echo "ComfyUI source not found at $COMFY (set COMFYUI_DIR)" >&2
    exit 1
fi

# What the stamp records: any change re-runs the installs (pip then skips what is present).
want="$(printf '%s\n' "$TORCH_SET" "$(cat "$COMFY/requirements.txt")" requests pytest playwright "$(cat "$ROOT/install.py")" | sha256sum | cut -d' ' -f1)"
if [ -z "${FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
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
if ! "$VPY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
want = {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0"}
sys.exit(0 if all(m.version(k).split("+")[0] == v for k, v in want.items()) else 1)
PYEOF
then
    "$VPY" -m pip install $TORCH_SET
fi

# 2. the host's own requirements, plus requests (imported by the host, not listed), pytest, and
#    playwright (the Python package only, driving the system Chromium for tools/screenshot_comfyui.py;
#    no browser is downloaded: never `playwright install`). A constraints
#    file pins the torch set so nothing here replaces it.
cons="$(mktemp)"
trap 'rm -f "$cons"' EXIT
printf '%s\n' $TORCH_SET > "$cons"
"$VPY" -m pip install -c "$cons" -r "$COMFY/requirements.txt" requests pytest playwright

# 3. the pack's own needs, the way ComfyUI-Manager installs them.
"$VPY" "$ROOT/install.py"

echo "$want" > "$STAMP"
echo "ready: $VPY"
