"""The list of host symbols the ComfyUI pack uses (tests/integration/host_symbols.json) is the one its
source gives today; tests/integration/test_host_symbols.py checks that list against each host."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_tool():
    spec = importlib.util.spec_from_file_location("host_symbols", REPO / "tools" / "host_symbols.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kept_list_matches_the_source():
    tool = import_tool()
    kept = json.loads(tool.LIST.read_text())
    assert kept == tool.extract(), "nodes/ uses other host symbols now: run `python tools/host_symbols.py`"


def test_extraction_follows_aliases_and_records_call_shapes():
    tool = import_tool()
    listing = tool.extract()
    # `import comfy.model_management as mm` ... `mm.load_models_gpu(patchers, memory_required=...)`
    assert "comfy.model_management.load_models_gpu" in listing["symbols"]
    assert {"symbol": "comfy.model_management.load_models_gpu", "file": "nodes/comfy_backend.py", "args": 1,
            "keywords": ["memory_required"]} in listing["calls"]
    # `from comfy_execution.utils import get_executing_context`
    assert "comfy_execution.utils.get_executing_context" in listing["symbols"]
    assert not [s for s in listing["symbols"] if s.startswith(("dreambooth_core", "torch"))]
