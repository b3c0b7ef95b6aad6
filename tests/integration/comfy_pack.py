"""Import this repository as a ComfyUI custom-node package, the way the host's loader does.

Shared by the integration tests and bench/comfy_child.py (which puts this folder on sys.path)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "comfyui_dreambooth"


def import_pack() -> ModuleType:
    """The pack's root `__init__.py` as package PACK_MODULE (once per process)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
