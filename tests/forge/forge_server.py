"""Start the real Forge WebUI (lllyasviel's stable-diffusion-webui-forge) for tests: a temporary copy of
../shared/forge (read-only source; its `repositories/` linked) with this repository's extension and the
test checkpoints, started API-only on CPU in fp32 as ../shared/FORGE_NOTES.md describes. The server
object, the port and the stop are the A1111 helper's (tests/a1111/webui_server.py)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "a1111"))
from webui_server import WebUI, _free_port, launch, prepare_copy, stop_webui  # noqa: E402,F401

REPO = HERE.parents[1]
FORGE_DIR = Path(os.environ.get("FORGE_DIR", REPO.parent / "shared" / "forge")).resolve()
# What Forge imports that the core's environment (and A1111's) lacks.
HOST_MODULES = ("gradio", "diffusers", "joblib", "torchsde", "spandrel", "peft")


def skip_reason() -> str:
    """Why Forge cannot be started from this Python ('' when it can)."""
    if not (FORGE_DIR / "launch.py").is_file() or not (FORGE_DIR / "backend" / "diffusion_engine").is_dir():
        return f"the Forge source is not at {FORGE_DIR} (set FORGE_DIR)"
    missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("transformers") is None:
        return (f"not running under Forge's Python ({sys.executable} lacks {', '.join(missing) or 'transformers'}): "
                "run `bash tools/setup_forge_env.sh` then `.venv-forge/bin/python -m pytest tests/forge`")
    if not (FORGE_DIR / "repositories" / "huggingface_guess" / "huggingface_guess").is_dir():
        return (f"Forge's repositories/huggingface_guess is not in {FORGE_DIR} (its launcher clones it; "
                "see ../shared/FORGE_NOTES.md)")
    return ""


SKIP_REASON = skip_reason()


def start_forge(tmp: Path, checkpoints: Iterable[Path], selected: Path, ui: bool = False,
                start_timeout: float = 600, prepare: Optional[Callable[[Path], None]] = None) -> WebUI:
    """Copy Forge into `tmp`, add the extension and the checkpoints (`prepare(root)` then changes the copy),
    start it with `selected` chosen; returns once the API answers (the checkpoint loads at the first
    generation, as in Forge)."""
    root = tmp / "forge"
    models = prepare_copy(FORGE_DIR, root, FORGE_DIR / "repositories", checkpoints)
    if prepare is not None:
        prepare(root)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}  # Forge points it at its own folder
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--skip-python-version-check", "--always-cpu", "--all-in-fp32", "--api",
            "--server-name", "127.0.0.1", "--port", str(port), "--skip-version-check", "--no-download-sd-model",
            "--ckpt", str(models / selected.name)] + ([] if ui else ["--nowebui"])
    return launch(root, args, env, tmp / "forge.log", port, "/config" if ui else "/sdapi/v1/options", "Forge",
                  start_timeout)
