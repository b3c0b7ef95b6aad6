"""The core's layers, read off its imports (docs/architecture.md): data flows one way, the core never
imports a host, and the hosts hold no training logic of their own."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dreambooth_core"
HOSTS = ("comfy", "comfy_extras", "folder_paths", "server", "nodes", "modules", "scripts", "execution")
# Left to right: a part may import the parts left of it (and the shared modules), never one to its right.
FLOW = ("dataset", "class_images", "adapters", "training", "sampling", "job", "evaluation", "cli")
SHARED = ("__init__", "config", "fileio", "plots", "backends", "embedded")


def _part(module: str) -> str:
    """`dreambooth_core.training.trainer` -> `training`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(absolute module, line) of every import in a core file, relative ones resolved."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module]
            for name in names:
                yield name, node.lineno


def _core_files():
    return sorted(p for p in CORE.rglob("*.py") if "assets" not in p.parts)


def test_the_core_never_imports_a_host():
    found = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _core_files() for name, line in _imports(p)
             if name.split(".")[0] in HOSTS]
    assert not found, found


def test_data_flows_one_way_through_the_core():
    found = []
    for path in _core_files():
        here = _part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if here not in FLOW:
            continue
        for name, line in _imports(path):
            if not name.startswith("dreambooth_core."):
                continue
            there = _part(name)
            if there in FLOW and FLOW.index(there) > FLOW.index(here):
                found.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {name}, which comes after it")
    assert not found, found


def test_the_shared_modules_import_no_stage_of_the_flow():
    found = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _core_files()
             if _part(".".join(p.relative_to(ROOT).with_suffix("").parts)) in ("config", "fileio", "plots")
             for name, line in _imports(p) if name.startswith("dreambooth_core.") and _part(name) in FLOW]
    assert not found, found


def test_the_hosts_take_training_logic_only_from_the_core():
    """No loss, optimizer, LR schedule or LoRA file writing in nodes/ or scripts/: a reviewer's check,
    made by reading their code for the calls that would be one."""
    forbidden = ("torch.optim", "AdamW", "mse_loss", "LambdaLR", "save_file", "lora_down.weight", "alphas_cumprod[")
    found = []
    for path in sorted([*(ROOT / "nodes").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {word}" for word in forbidden if word in text]
    assert not found, found
