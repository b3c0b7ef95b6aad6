"""The WebUI entry script loads on WebUIs whose callbacks take a name (A1111 1.10, Forge) and on forks
whose callbacks take none (Forge Classic, SD.Next), where registering with name= raised TypeError."""
from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dreambooth_tab.py"


def _fake_modules(monkeypatch, named: bool) -> list:
    registered = []

    def make(kind):
        if named:
            def add(callback, *, name=None):
                registered.append((kind, callback, name))
        else:
            def add(callback):
                registered.append((kind, callback, None))
        return add

    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_app_started, callbacks.on_ui_tabs = make("app_started"), make("ui_tabs")
    package = types.ModuleType("modules")
    package.script_callbacks = callbacks
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return registered


@pytest.mark.parametrize("named", [True, False])
def test_the_entry_script_registers_its_tab_and_routes(monkeypatch, named):
    registered = _fake_modules(monkeypatch, named)
    runpy.run_path(str(SCRIPT))
    assert [kind for kind, _, _ in registered] == ["app_started", "ui_tabs"]
    assert all(name == ("dreambooth" if named else None) for _, _, name in registered)
