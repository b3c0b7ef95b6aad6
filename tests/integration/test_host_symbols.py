"""Every ComfyUI name the pack uses (tests/integration/host_symbols.json) exists in this host, and every
call the pack makes to one still binds to its signature (tools/host_symbols.py)."""
from __future__ import annotations

import json

from test_host_symbols import import_tool  # tests/test_host_symbols.py: the unit side of the same list


def test_every_host_symbol_the_pack_uses_resolves_and_every_call_binds(host):
    tool = import_tool()
    problems = tool.check(json.loads(tool.LIST.read_text()))
    assert not problems, "\n".join(problems)


def test_a_missing_name_or_a_call_that_no_longer_binds_is_named(host):
    tool = import_tool()
    problems = tool.check({
        "symbols": ["comfy.model_management.load_models_gpu", "comfy.model_management.no_such_function"],
        "calls": [{"symbol": "comfy.model_management.load_models_gpu", "file": "nodes/x.py", "args": 1,
                   "keywords": ["no_such_keyword"]}]})
    assert len(problems) == 2, problems
    assert problems[0].startswith("comfy.model_management.no_such_function: missing")
    assert "load_models_gpu (nodes/x.py)" in problems[1] and "no_such_keyword" in problems[1]
