"""Integration tests against the real host: the ComfyUI at COMFYUI_DIR (default ../shared/comfyui, 0.3.64;
tools/test.sh runs them on ../shared/comfyui-0.33 too), read-only.

They need the host's Python (tools/setup_comfyui_env.sh makes .venv-comfyui):

    bash tools/setup_comfyui_env.sh
    .venv-comfyui/bin/python -m pytest -m integration tests/integration

Under any other Python (e.g. the core's .venv) every test here is skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()
HERE = Path(__file__).resolve().parent
# What ComfyUI imports that the core's environment lacks: a Python without these is not the host's.
HOST_MODULES = ("torchsde", "aiohttp", "einops", "torchvision", "torchaudio", "av", "sqlalchemy", "alembic")


def host_skip_reason() -> str:
    if not (COMFYUI_DIR / "main.py").is_file():
        return f"ComfyUI source not found at {COMFYUI_DIR} (set COMFYUI_DIR)"
    missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"not running under the host's Python ({sys.executable} lacks {', '.join(missing)}): run "
                "`bash tools/setup_comfyui_env.sh` then `.venv-comfyui/bin/python -m pytest -m integration "
                "tests/integration`")
    return ""


SKIP_REASON = host_skip_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


if str(HERE) not in sys.path:  # the helper modules beside this file (mini_checkpoint, comfy_api)
    sys.path.append(str(HERE))


@pytest.fixture(scope="session")
def mini_checkpoint() -> Path:
    """The seeded mini SD1.5 checkpoint (built once, cached across runs)."""
    _host_in_process()  # the builder uses ComfyUI's own model classes
    import mini_checkpoint as mc

    return mc.ensure_checkpoint()


def _host_in_process():
    """Import ComfyUI in this process, configured as `main.py --cpu` would, with its folders in a
    temporary base directory. ComfyUI's own folder goes first on sys.path: its top-level `nodes`
    module must win over this repository's `nodes/` package (which belongs to the pack)."""
    if "comfy.model_management" in sys.modules:
        return sys.modules["folder_paths"]
    sys.path.insert(0, str(COMFYUI_DIR))
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        del sys.modules["nodes"]
    import utils.extra_config  # noqa: F401  (first, as main.py: later imports put comfy/utils.py on `utils`)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    torch.set_num_threads(1)
    import comfy.model_management  # noqa: F401  (reads args: CPU)
    import folder_paths

    return folder_paths


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """folder_paths of an in-process host whose input/output/temp/loras live in a temp folder."""
    folder_paths = _host_in_process()
    base = tmp_path_factory.mktemp("comfy-base")
    for name in ("input", "output", "temp", "loras"):
        (base / name).mkdir()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    folder_paths.base = base
    return folder_paths


@pytest.fixture(scope="session")
def pack(host):
    """The node pack, imported the way ComfyUI imports a custom node folder (as a package)."""
    from comfy_pack import import_pack

    return import_pack()


@pytest.fixture(scope="module")
def loaded(host, pack, mini_checkpoint):
    """(MODEL, CLIP, VAE) of the mini SD1.5 checkpoint through the stock loader, under inference mode as
    the executor loads it; once per test module (tests may leave patches on their clones)."""
    import comfy.sd
    import torch

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(mini_checkpoint))[:3]
    return model, clip, vae


@pytest.fixture(scope="module")
def comfy_host(host, pack):
    """The host with the family fixtures' folder as a diffusion_models path; a module's models unloaded after it
    (test_flow_families, test_memory_levers: one family's checkpoints in memory at a time)."""
    import family_checkpoints as fc

    host.add_model_folder_path("diffusion_models", str(fc.cache_dir()))
    yield host
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
