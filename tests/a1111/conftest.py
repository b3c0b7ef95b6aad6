"""Integration tests against the real Automatic1111 WebUI (v1.10.1, read-only at ../shared/a1111).

They need the WebUI's Python (tools/setup_a1111_env.sh makes .venv-a1111) and the repositories
its launcher would clone (`repositories/` inside the WebUI folder, or A1111_REPOSITORIES):

    bash tools/setup_a1111_env.sh
    .venv-a1111/bin/python -m pytest tests/a1111

The WebUI is copied to a temporary folder with this repository linked as `extensions/dreambooth`,
seeded mini SD1.5 (loaded) and SDXL checkpoints (+ .yaml) in its models folder, and started API-only on CPU on a
free loopback port, at DEBUG log level (the Lora loader reports unmatched keys only there).
Under any other Python every test here is skipped with the reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_server import A1111_DIR, CLIP_CONFIG, SKIP_REASON, repositories_dir, start_webui, stop_webui  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON:
        here = Path(__file__).parent
        for item in items:
            if here in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def mini_checkpoint() -> Path:
    from a1111_checkpoint import ensure_checkpoint

    return ensure_checkpoint(A1111_DIR, repositories_dir(), CLIP_CONFIG)


@pytest.fixture(scope="session")
def sdxl_checkpoint() -> Path:
    from a1111_checkpoint import ensure_sdxl_checkpoint

    return ensure_sdxl_checkpoint(repositories_dir(), CLIP_CONFIG)


@pytest.fixture(scope="session")
def webui(tmp_path_factory, mini_checkpoint, sdxl_checkpoint):
    """One server for the session, the mini SD1.5 loaded; the mini SDXL beside it (test_webui_sdxl loads it)."""
    server = start_webui(tmp_path_factory.mktemp("a1111"), mini_checkpoint, others=[sdxl_checkpoint])
    yield server
    stop_webui(server)


@pytest.fixture(scope="session")
def host(webui):
    """The running server, by the name the shared API tests (tests/a1111/webui_api.py) use."""
    return webui


@pytest.fixture(scope="session")
def subject_dir(webui) -> Path:
    """Three 64×64 photos of a 'subject' (a red disc on different backgrounds), in the WebUI's folder (the
    API refuses folders outside it)."""
    from webui_server import write_subject

    return write_subject(webui.root / "inputs" / "subject")
