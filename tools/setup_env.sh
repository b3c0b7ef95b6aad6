#!/usr/bin/env bash
# Create .venv with torch and this project (editable, with test extras). Idempotent.
# TORCH_SPEC chooses the torch build (default: torch 2.13.0, which is the CPU build where a
# local wheel exists and the registry's default build elsewhere); an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.dreambooth-setup
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import torch, diffusers, dreambooth_core" 2>/dev/null; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VPY" -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
