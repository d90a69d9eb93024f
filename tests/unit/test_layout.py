"""The layout's rules (docs/architecture.md), checked on the source: the layers import downwards
only, no module-level import cycle, and modules stay small."""
from __future__ import annotations

import ast

from paths import ROOT

PACKAGE = ROOT / "jupyter_llm"
FRONT_ENDS = ("jupyter_llm.notebook", "jupyter_llm.server", "jupyter_llm.bench")


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def top_level_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules a module imports when it is imported (not inside functions or TYPE_CHECKING)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("jupyter_llm"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in known)
    return {name for name in found if name in known}


def test_no_module_level_import_cycle():
    trees = modules()
    graph = {name: top_level_imports(tree, set(trees)) for name, tree in trees.items()}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        graph[name] |= {".".join(parts[:i]) for i in range(1, len(parts))} - {name}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ importing its own submodules is the usual re-export, not a cycle: a
    # cycle that runs through a package and only its own submodules. (Checked whichever node the
    # search happened to enter the cycle by.)
    def within_one_package(cycle: list[str]) -> bool:
        return any(all(n == p or n.startswith(p + ".") for n in cycle) for p in cycle)

    real = [c for c in cycles if not within_one_package(c)]
    assert not real, real


def test_backends_and_core_import_no_front_end():
    offenders = []
    for name, tree in modules().items():
        if name.startswith(FRONT_ENDS) or name in ("jupyter_llm", "jupyter_llm.cli"):
            continue  # the front ends, the extension's entry point and the CLI sit on top
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(FRONT_ENDS):
                offenders.append(f"{name} imports {node.module}")
            if isinstance(node, ast.Import):
                offenders += [f"{name} imports {a.name}" for a in node.names if a.name.startswith(FRONT_ENDS)]
    assert not offenders, offenders


def test_modules_stay_small():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 450 or (lines > 400 and "lines" not in docstring):  # over 400 says why in its docstring
            too_long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert not too_long, too_long
