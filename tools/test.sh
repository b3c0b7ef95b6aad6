#!/usr/bin/env bash
# The whole test suite: core unit tests in .venv, then the ComfyUI integration tests against the
# real host (../shared/comfyui) in .venv-comfyui. Both environments are created if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q tests --ignore=tests/integration "$@"
if [ -f tools/setup_comfyui_env.sh ] && [ -d tests/integration ]; then
  bash tools/setup_comfyui_env.sh
  .venv-comfyui/bin/python -m pytest -q tests/integration "$@"
fi
