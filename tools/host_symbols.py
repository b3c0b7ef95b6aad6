"""Which ComfyUI symbols the pack uses, read from its source, and whether a host still has them.

ComfyUI's `comfy.*` internals have no deprecation policy: a name moves or a parameter goes, and a
pack dies at import or mid-run. This lists every host name that `nodes/` and `__init__.py` reach
through an import (`comfy.*`, `comfy_extras.*`, `comfy_api.*`, `comfy_execution.*`, `folder_paths`,
...) and the shape of every call made to one, and checks them against a host copy:

    python tools/host_symbols.py            # rewrite tests/integration/host_symbols.json from the source
    python tools/host_symbols.py --check    # under a host's Python, with COMFYUI_DIR: resolve and bind each

tests/test_host_symbols.py keeps the JSON current; tests/integration/test_host_symbols.py runs the
check on every host that tools/test.sh tests. Calls through objects (`model.clone()`) are not
reachable statically; the integration tests exercise those.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
LIST = REPO / "tests" / "integration" / "host_symbols.json"
SOURCES = ("__init__.py", "nodes")
HOST_ROOTS = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "execution",
              "node_helpers", "latent_preview", "nodes"}
# Reached through sys.modules at run time (nodes/live.py), so no import names them.
DYNAMIC = ("server.PromptServer",)


def _files() -> List[Path]:
    out = []
    for name in SOURCES:
        path = REPO / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _aliases(tree: ast.AST) -> Dict[str, str]:
    """Local name -> dotted host name, from every absolute import of a host module in the file."""
    names: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in HOST_ROOTS:
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in HOST_ROOTS:
                for a in node.names:
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id]] + parts[::-1])
    return None


def extract() -> dict:
    """{"symbols": [...], "calls": [{"symbol", "file", "args", "keywords"}]}, sorted and de-duplicated."""
    symbols, calls = set(DYNAMIC), set()
    for path in _files():
        tree = ast.parse(path.read_text(), str(path))
        aliases = _aliases(tree)
        symbols.update(aliases.values())
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in inner:
                name = _dotted(node, aliases)
                if name:
                    symbols.add(name)
            if isinstance(node, ast.Call):
                name = _dotted(node.func, aliases)
                spread = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
                if name and not spread:
                    calls.add((name, path.relative_to(REPO).as_posix(), len(node.args),
                               tuple(sorted(k.arg for k in node.keywords))))
    return {"symbols": sorted(symbols),
            "calls": [{"symbol": s, "file": f, "args": n, "keywords": list(k)} for s, f, n, k in sorted(calls)]}


def resolve(name: str):
    """The object a dotted name stands for: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError names the missing piece
        return obj
    raise ImportError(f"no module of {name} can be imported")


def check(listing: dict) -> List[str]:
    """Every problem as one line naming the symbol; [] when the host has them all."""
    problems = []
    for name in listing["symbols"]:
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{name}: missing ({exc})")
    for call in listing["calls"]:
        try:
            target = resolve(call["symbol"])
            signature = inspect.signature(target)
        except (ImportError, AttributeError):
            continue  # reported above
        except (TypeError, ValueError):  # a builtin without a signature: nothing to bind against
            continue
        try:
            signature.bind(*([None] * call["args"]), **{k: None for k in call["keywords"]})
        except TypeError as exc:
            problems.append(f"{call['symbol']} ({call['file']}): a call with {call['args']} positional argument(s) "
                            f"and keywords {call['keywords']} no longer binds to {signature}: {exc}")
    return problems


def host_on_path(comfy_dir: Path) -> None:
    """Import the host as `main.py --cpu` would, its folder first on sys.path."""
    sys.path.insert(0, str(comfy_dir))
    import utils.extra_config  # noqa: F401  (first, as main.py: later imports put comfy/utils.py on `utils`)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="check the list against the host at COMFYUI_DIR")
    args = p.parse_args(argv)
    if not args.check:
        LIST.write_text(json.dumps(extract(), indent=1) + "\n")
        print(f"wrote {LIST.relative_to(REPO)}")
        return 0
    host_on_path(Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve())
    problems = check(json.loads(LIST.read_text()))
    print("\n".join(problems) or "every symbol resolves and every call binds")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
