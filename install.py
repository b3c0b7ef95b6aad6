"""Install what the DreamBooth pack needs into the host's Python (ComfyUI or the Automatic1111 WebUI).

ComfyUI-Manager runs this file with the host's interpreter when the pack is installed; the WebUI
runs an extension's install.py at every start. It installs only the packages that are missing,
with ``python -m pip install``: a package the host already has is left at the host's version (the
WebUI pins old ones, e.g. Pillow 9.5, accelerate 0.21, and the core works with them). It never
installs, upgrades or downgrades torch (the host owns torch and its CUDA build), and it does not
install diffusers (neither host backend needs it).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

# import name -> pip requirement
REQUIREMENTS = {
    "accelerate": "accelerate>=0.21",
    "safetensors": "safetensors>=0.4",
    "PIL": "pillow>=10.0",
    "numpy": "numpy>=1.24",
    "tqdm": "tqdm>=4.60",
}


def missing() -> list:
    return [req for mod, req in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print("[dreambooth] torch is not installed in this Python; install the host (ComfyUI or the WebUI) "
              "first. This script never installs torch.", file=sys.stderr)
        return 1
    todo = missing()
    if not todo:
        print("[dreambooth] all requirements present")
        return 0
    print("[dreambooth] installing: " + " ".join(todo))
    # accelerate depends on torch: a constraint pins the host's own torch build, so pip either keeps
    # it or refuses (an old torch) instead of replacing the host's CUDA/ROCm build.
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w") as f:
            f.write(f"torch=={version('torch')}\n")
        cmd = [sys.executable, "-m", "pip", "install", "--upgrade-strategy", "only-if-needed", "-c", constraints, *todo]
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
