"""Integration tests against the real Forge WebUI (lllyasviel's Forge, read-only at ../shared/forge).

They need Forge's Python (tools/setup_forge_env.sh makes .venv-forge):

    bash tools/setup_forge_env.sh
    .venv-forge/bin/python -m pytest tests/forge

Forge is copied to a temporary folder with this repository linked as `extensions/dreambooth`, seeded
mini SD1.5 checkpoints (forge_checkpoint.py: one text-to-image, one inpainting), a tiny Flux dev and a tiny
SD3.5 (flow_checkpoint.py, with its scaffolding in the copy) in its models folder, and started API-only on CPU
in fp32. Under any other Python every test here is skipped with the reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forge_server import FORGE_DIR, SKIP_REASON, start_forge, stop_webui  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON:
        here = Path(__file__).parent
        for item in items:
            if here in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def flow_checkpoints() -> dict:
    """family -> tiny Flux dev / Flux schnell / Chroma checkpoint (flow_checkpoint.py)."""
    from flow_checkpoint import ensure_checkpoints

    return ensure_checkpoints(FORGE_DIR)


@pytest.fixture(scope="session")
def checkpoints(flow_checkpoints) -> dict:
    from forge_checkpoint import ensure_checkpoint

    return {"sd15": ensure_checkpoint(FORGE_DIR), "inpaint": ensure_checkpoint(FORGE_DIR, inpaint=True),
            "flux": flow_checkpoints["flux"], "sd35-large": flow_checkpoints["sd35-large"]}


@pytest.fixture(scope="session")
def forge(tmp_path_factory, checkpoints):
    """The session's server; its copy of Forge builds the tiny Flux and SD3.5 small (flow_checkpoint.scaffold)."""
    from flow_checkpoint import scaffold

    server = start_forge(tmp_path_factory.mktemp("forge"), checkpoints.values(), checkpoints["sd15"],
                         prepare=scaffold)
    yield server
    stop_webui(server)


@pytest.fixture(scope="session")
def host(forge):
    """The running server, by the name the shared API tests (tests/a1111/webui_api.py) use."""
    return forge


@pytest.fixture(scope="session")
def subject_dir(forge) -> Path:
    """Three 64×64 photos of a 'subject' (a red disc on different backgrounds), in Forge's folder."""
    from webui_server import write_subject

    return write_subject(forge.root / "inputs" / "subject")
