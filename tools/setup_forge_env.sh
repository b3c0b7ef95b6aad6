#!/usr/bin/env bash
# Create the virtual environment for the Forge integration tests: .venv-forge at the repository root
# (ignored by git), as ../shared/FORGE_NOTES.md describes: the registry's default torch build with
# torchvision, Forge's pinned requirements_versions.txt unchanged, and joblib (not listed there, but the
# built-in soft-inpainting script fails to load without it). Forge reads its tokenizers and model configs
# from its own backend/huggingface/ folder, so no hub cache is built. Idempotent (a stamp file).
#
#   bash tools/setup_forge_env.sh            # create / update
#   FORCE=1 bash tools/setup_forge_env.sh    # reinstall everything
#
# Then: FORGE_DIR=../shared/forge .venv-forge/bin/python -m pytest tests/forge
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FORGE="${FORGE_DIR:-$ROOT/../shared/forge}"
VENV="${FORGE_VENV:-$ROOT/.venv-forge}"
PY="${PYTHON:-python3}"
TORCH_SET="torch==2.11.0 torchvision==0.26.0"
STAMP="$VENV/.dreambooth-setup-stamp"
. "$ROOT/tools/venv_common.sh"

for f in "$FORGE/launch.py" "$FORGE/requirements_versions.txt" "$FORGE/backend/diffusion_engine/base.py"; do
    if [ ! -f "$f" ]; then
        echo "setup_forge_env: $f not found (set FORGE_DIR to a Forge folder)" >&2
        exit 1
    fi
done

want="$(printf '%s\n' "$TORCH_SET" "$(cat "$FORGE/requirements_versions.txt")" joblib pytest \
        "$(cat "$ROOT/install.py")" "$(cat "$0")" | sha256sum | cut -d' ' -f1)"
if venv_is_current "$STAMP" "$want" "$VENV"; then
    echo "$VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# 1. torch + torchvision as a set, first, so that nothing later replaces them.
install_torch_set "$VPY" "$TORCH_SET"

# 2. Forge's pinned requirements (unchanged), joblib (soft inpainting needs it), pytest; keeping the torch set.
pip_keeping_torch "$VPY" "$TORCH_SET" -r "$FORGE/requirements_versions.txt" joblib pytest

# 3. the extension's own needs, the way the WebUI runs an extension's install.py.
"$VPY" "$ROOT/install.py"

echo "$want" > "$STAMP"
echo "ready: $VPY"
