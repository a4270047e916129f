"""The shape of the code: which folder imports which, and who may know families and objectives.

minivlm's folders form layers, each importing only those below it:

    minivlm/models/        the families: import nothing of minivlm but each other
    minivlm/reference/     NF4 and 8-bit AdamW written out: import nothing of minivlm but each other
    minivlm/               the library (config, data, batches, steps, build, lora, loop, ...)
    minivlm/objectives/    SFT, DPO, GRPO: built on the library, which never imports them
    minivlm/cli/           the command lines (train.py and infer.py run them): nothing imports them

The command lines (and walkthrough.py, outside the package) look the objective up and hand it in.
Read from the source with ast, imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "minivlm"
LAYERS = ["minivlm/models", "minivlm/reference", "minivlm", "minivlm/objectives", "minivlm/cli"]  # bottom first


def folder(module: str) -> str:
    """'minivlm.models.chat' -> 'minivlm/models'; 'minivlm.loop' (a module of minivlm/) -> 'minivlm'."""
    parts = module.split(".")
    path = ROOT.joinpath(*parts)
    return "/".join(parts) if path.is_dir() and len(parts) > 1 else "/".join(parts[:-1]) or "minivlm"


def imports(path: Path) -> set[str]:
    """The minivlm modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minivlm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minivlm"):
            # `from minivlm.models import chat` imports the module minivlm.models.chat
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (ROOT / f"{sub.replace('.', '/')}.py").is_file() else node.module)
    return found


def modules() -> dict[str, Path]:
    return {str(p.relative_to(ROOT).with_suffix("")).replace("/", "."): p for p in PACKAGE.rglob("*.py")}


def test_folders_import_only_the_layers_below_them():
    edges = {}
    for name, path in modules().items():
        source = folder(name) if not name.endswith("__init__") else "/".join(name.split(".")[:-1])
        for target in imports(path):
            dest = folder(target)
            if dest != source:
                edges.setdefault((source, dest), []).append(f"{name} -> {target}")
    upward = {pair: where for pair, where in edges.items() if LAYERS.index(pair[1]) > LAYERS.index(pair[0])}
    assert not upward, f"imports from a folder to one above it (a cycle between folders): {upward}"
    # And the layers are used: the library reads the families, the objectives the library.
    assert ("minivlm", "minivlm/models") in edges and ("minivlm/objectives", "minivlm") in edges
    assert ("minivlm/cli", "minivlm/objectives") in edges


def string_constants(path: Path) -> set[str]:
    """The string literals of a module's code (docstrings and comments are prose, not code)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_only_the_families_name_a_family_and_only_the_objectives_and_config_an_objective():
    from minivlm.config import OBJECTIVES
    from minivlm.models import FAMILIES

    for name, path in modules().items():
        words = {w for s in string_constants(path) for w in s.replace("/", " ").replace(".", " ").split()}
        if not name.startswith("minivlm.models"):
            assert not words & set(FAMILIES), f"{name} names a family: {words & set(FAMILIES)}"
        if not name.startswith(("minivlm.objectives", "minivlm.cli")) and name != "minivlm.config":
            assert not words & set(OBJECTIVES), f"{name} names an objective: {words & set(OBJECTIVES)}"
            tree = ast.parse(path.read_text())
            reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "objective"]
            assert not reads, f"{name} reads train.objective (line {reads[0].lineno}): only the command lines look it up"
