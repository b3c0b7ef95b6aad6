#!/usr/bin/env bash
# Create the WebUI's virtual environment for the Automatic1111 integration tests: .venv-a1111 at
# the repository root (ignored by git), as ../shared/A1111_NOTES.md describes: the registry's
# default torch build with torchvision, the WebUI's pinned requirements_versions.txt, the `clip`
# package from the zip beside it, and an offline hub cache for the CLIP-L tokenizer/config built
# from ComfyUI's copies (nothing is downloaded from a model hub). Idempotent (a stamp file).
#
#   bash tools/setup_a1111_env.sh            # create / update
#   FORCE=1 bash tools/setup_a1111_env.sh    # reinstall everything
#
# Then: .venv-a1111/bin/python -m pytest tests/a1111
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
A1111="${A1111_DIR:-$ROOT/../shared/a1111}"
COMFY="${COMFYUI_DIR:-$ROOT/../shared/comfyui}"
VENV="${A1111_VENV:-$ROOT/.venv-a1111}"
PY="${PYTHON:-python3}"
TORCH_SET="torch==2.11.0 torchvision==0.26.0"
STAMP="$VENV/.dreambooth-setup-stamp"
. "$ROOT/tools/venv_common.sh"

for f in "$A1111/launch.py" "$A1111/requirements_versions.txt" "$COMFY/comfy/sd1_clip_config.json"; do
    if [ ! -f "$f" ]; then
        echo "setup_a1111_env: $f not found (set A1111_DIR / COMFYUI_DIR)" >&2
        exit 1
    fi
done
CLIP_ZIP="$(ls "$A1111"/CLIP-*.zip | head -n1)"

want="$(printf '%s\n' "$TORCH_SET" "$(cat "$A1111/requirements_versions.txt")" "$(basename "$CLIP_ZIP")" pytest \
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

# 2. the WebUI's pinned requirements (unchanged), the clip package, pytest; keeping the torch set.
pip_keeping_torch "$VPY" "$TORCH_SET" -r "$A1111/requirements_versions.txt" wheel pytest
pip_keeping_torch "$VPY" "$TORCH_SET" --no-build-isolation "$CLIP_ZIP"

# 3. the extension's own needs, the way the WebUI runs an extension's install.py.
"$VPY" "$ROOT/install.py"

# 4. offline hub cache: openai/clip-vit-large-patch14 → tokenizer files + text config.
HF="$VENV/hf-home"
SNAP="$HF/hub/models--openai--clip-vit-large-patch14/snapshots/0000000000000000000000000000000000000001"
mkdir -p "$SNAP" "$HF/hub/models--openai--clip-vit-large-patch14/refs"
cp "$COMFY"/comfy/sd1_tokenizer/* "$SNAP/"
cp "$COMFY/comfy/sd1_clip_config.json" "$SNAP/config.json"
printf '%s' 0000000000000000000000000000000000000001 > "$HF/hub/models--openai--clip-vit-large-patch14/refs/main"

echo "$want" > "$STAMP"
echo "ready: $VPY (HF_HOME=$HF)"
