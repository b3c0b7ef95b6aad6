"""Automatic1111 WebUI entry point: the WebUI imports every `scripts/*.py` of an extension.

This file only registers the DreamBooth tab and the API routes; the adapter lives in the
`dreambooth_a1111` package beside it and all training logic in `dreambooth_core`.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# While the WebUI imports an extension's scripts, the extension's root is on sys.path: bind
# dreambooth_core now (its later lazy imports then resolve through the package's own path). The
# adapter package sits beside this file, a folder the WebUI does not import scripts from.
import dreambooth_core  # noqa: E402,F401

if str(_HERE) not in sys.path:
    sys.path.append(str(_HERE))

from dreambooth_a1111 import api, ui  # noqa: E402
from modules import script_callbacks  # noqa: E402


def _on_app_started(demo, app) -> None:
    api.add_routes(app)


def _register(add, callback) -> None:
    """Register a callback, named where the WebUI's callbacks take a name (A1111 1.6+, Forge); forks
    whose callbacks take none (Forge Classic, SD.Next) get it unnamed."""
    try:
        add(callback, name="dreambooth")
    except TypeError:
        add(callback)


_register(script_callbacks.on_app_started, _on_app_started)
_register(script_callbacks.on_ui_tabs, ui.create_tab)
