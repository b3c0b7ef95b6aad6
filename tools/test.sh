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
# Live training view in a real browser (tests/browser): Debian's chromium is installed if missing
# and possible; otherwise the browser test skips with the reason and the rest still runs.
if [ -d tests/browser ] && [ -x .venv-comfyui/bin/python ]; then
  bash tools/setup_browser.sh
  .venv-comfyui/bin/python -m pytest -q tests/browser "$@"
fi
# Automatic1111 WebUI extension (tests/a1111) against the real WebUI (../shared/a1111) in .venv-a1111.
# The WebUI's repositories must be in ../shared/a1111/repositories or $A1111_REPOSITORIES, else the
# tests skip with the reason.
if [ -f tools/setup_a1111_env.sh ] && [ -d tests/a1111 ]; then
  repos="${A1111_REPOSITORIES:-../shared/a1111/repositories}"
  if [ -d "$repos/stable-diffusion-stability-ai" ]; then
    bash tools/setup_a1111_env.sh
    .venv-a1111/bin/python -m pytest -q tests/a1111 "$@"
  else
    echo "SKIPPED tests/a1111: the WebUI cannot start without its repositories ($repos is missing;" \
         "set A1111_REPOSITORIES to a folder holding them, see scripts/README.md)"
  fi
fi
