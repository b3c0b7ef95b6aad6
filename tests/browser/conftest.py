"""Browser tests: the real ComfyUI with this pack, its real front end in headless Chromium.

    bash tools/setup_comfyui_env.sh && bash tools/setup_browser.sh
    .venv-comfyui/bin/python -m pytest tests/browser

The session-wide fixtures skip (with the reason) where the host's Python, playwright or Chromium
is missing; tests that need none of them (test_live_events.py) run under any Python.
Screenshots go to $DREAMBOOTH_TEST_ARTIFACTS (default out/test-artifacts/).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO / "tools"))  # comfyui_browser (shared with tools/screenshot_comfyui.py)


@pytest.fixture(scope="session")
def browser_ready() -> None:
    import comfyui_browser as cb

    reason = cb.missing_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("DREAMBOOTH_TEST_ARTIFACTS") or REPO / "out" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def example_workflow() -> dict:
    import comfyui_browser as cb

    return json.loads(cb.WORKFLOW.read_text())


@pytest.fixture(scope="module")
def comfy(browser_ready, example_workflow, tmp_path_factory):
    """A running ComfyUI whose base directory has the pack, the mini checkpoint and input photos."""
    import comfyui_browser as cb

    os.environ.update(cb.THREAD_ENV)  # the checkpoint builder, when the cache is cold
    base = tmp_path_factory.mktemp("comfyui-browser")
    cb.prepare_base(base, example_workflow)
    with cb.start_server(base) as server:
        assert "IMPORT FAILED" not in server.log(), server.log()[-3000:]
        server.base = base
        yield server
