"""The layers import one way, and no module imports itself back through others.

    paft_kernels  ←  engine core  ←  {merge, paft_evals}  ←  engine.pipeline  ←  the command line

A module may import from its own layer and the layers below it, never above; merge and
paft_evals are siblings and import neither each other. The command line is every `__main__`
module and every function named `main` (the dispatch of `python -m ...`): they may import
anything, and nothing imports a `__main__`. Every import counts, at module level or inside a
function (a function-level import only postpones the dependency), and the graph of them has
no cycle. Both checks read the source (ast), so they see what an import at run time would do
without running it; a failure names the two files and the line.
"""
from __future__ import annotations

import ast
import os
from functools import cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("paft_kernels", "engine", "merge", "paft_evals")
# (layer, its rank): an import must go to a rank <= its own; same-rank siblings do not import each other
LAYERS = {"paft_kernels": 0, "engine core": 1, "merge": 2, "paft_evals": 2, "engine.pipeline": 3,
          "command line": 4}


def layer_of(module: str) -> str:
    if module.endswith(".__main__"):
        return "command line"
    if module == "engine.pipeline" or module.startswith("engine.pipeline."):
        return "engine.pipeline"
    top = module.split(".")[0]
    return "engine core" if top == "engine" else top


@cache
def modules() -> dict[str, str]:
    """{dotted module name: path relative to the repo} for every .py file of our packages."""
    found = {}
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), REPO)
                    dotted = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found[dotted] = rel
    return found


def _target(name: str) -> str | None:
    """The module of ours an imported name lands in (`engine.lora` for engine.lora.LoRALinear)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(module of ours it imports, line, inside a function named main) for every import statement."""
    path = os.path.join(REPO, modules()[module])
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []

    def visit(node, in_main: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_main or (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == "main")
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # from .x import y: relative to this module's package
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names]  # a submodule, or a name in `base`
            for name in names:
                target = _target(name)
                if target is not None and target != module:
                    found.append((target, child.lineno, inside))
            visit(child, inside)

    visit(tree, module.endswith(".__main__"))
    return found


def test_every_package_is_seen():
    layers = {layer_of(m) for m in modules()}
    assert layers == set(LAYERS), layers
    assert "engine.pipeline.run" in modules() and "engine.train" in modules()


def test_imports_go_one_way():
    wrong = []
    for module, path in sorted(modules().items()):
        mine = layer_of(module)
        for target, line, in_main in imports(module):
            theirs = layer_of(target)
            if theirs == "command line":
                wrong.append(f"{path}:{line} imports {modules()[target]}: a __main__ is a command, not a module "
                             f"(move what it needs into a module)")
            elif in_main:
                continue  # the command line's dispatch may use every layer
            elif LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
                wrong.append(f"{path}:{line} imports {modules()[target]}: {mine} must not import {theirs} "
                             f"(layers: {' <- '.join(LAYERS)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, in_main in imports(m) if not in_main}) for m in modules()}
    lines = {(m, t): line for m in modules() for t, line, _ in imports(m)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str):
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                steps = [f"{modules()[a]}:{lines[(a, b)]} imports {modules()[b]}" for a, b in zip(cycle, cycle[1:])]
                raise AssertionError("import cycle:\n  " + "\n  ".join(steps))
            if t not in state:
                walk(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_the_check_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: an engine core module importing the pipeline, and two modules
    importing each other, are both reported with the two files."""
    monkeypatch.setitem(modules(), "engine.fake_core", os.path.join(tmp_path, "fake_core.py"))
    monkeypatch.setitem(modules(), "engine.fake_other", os.path.join(tmp_path, "fake_other.py"))
    (tmp_path / "fake_core.py").write_text("from engine.pipeline import load_pipeline\nfrom engine import fake_other\n")
    (tmp_path / "fake_other.py").write_text("def f():\n    import engine.fake_core\n")
    found = imports("engine.fake_core")
    assert ("engine.pipeline", 1, False) in found and ("engine.fake_other", 2, False) in found
    try:
        test_imports_go_one_way()
    except AssertionError as e:
        assert "fake_core.py:1 imports engine/pipeline/__init__.py: engine core must not import engine.pipeline" in str(e)
    else:
        raise AssertionError("the upward import was not reported")
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "fake_core.py:2 imports" in str(e) and "fake_other.py:2 imports" in str(e)
    else:
        raise AssertionError("the cycle was not reported")
