"""The package's import structure: dependencies run one way, and nothing hides the graph.

Layers, lowest first (a module may import its own layer and the layers below, never above):

    0 core          foundations: validation, paths, devices, locks, errors, atomic files
    1 kernels, ops, data  custom ops (no nn.Module) and their public face; phantoms, NIfTI, patches, regions, cache
    2 model         the U-Net, its ops backend, conditioning, execution policy (recompute, offload, tiled)
    3 diffusion, eval   schedule, samplers, the one train/eval step; metrics and figures
    4 training, sampling   the run configuration, the trainer and checkpoints; whole-volume segmentation
    5 analysis      tracker, allocator model, simulator, planner, profiler
    6 cli           the commands
    7 the package's face (patchddm_fast/__init__.py, __main__.py)

Checked over the source with ``ast`` (import-linter would do the same; a short test needs no
extra dependency): every ``import``/``from ... import`` anywhere in a module, function-local
ones included, so a lazy import cannot hide an upward edge.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "patchddm_fast"

LAYERS: Dict[str, int] = {
    "core": 0, "kernels": 1, "ops": 1, "data": 1, "model": 2, "diffusion": 3, "eval": 3,
    "training": 4, "sampling": 4, "analysis": 5, "cli": 6, "__init__": 7, "__main__": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: its top-level package {top!r} has no layer; add it to LAYERS")
    return LAYERS[top]


def _imports(path: Path) -> List[Tuple[str, int, bool]]:
    """(imported module, line, nested in a function) for every project import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    found: List[Tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names if a.name.startswith("patchddm_fast"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import: resolve against this module's package
                    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                if base.startswith("patchddm_fast"):
                    for a in child.names:
                        sub = f"{base}.{a.name}"
                        target = sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                            (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base
                        found.append((target, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def _sources() -> List[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    for path in _sources():
        _layer(_module_name(path))


def test_no_upward_import():
    upward = []
    for path in _sources():
        src = _module_name(path)
        for target, line, _ in _imports(path):
            if _layer(target) > _layer(src):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} (layer {_layer(src)}) imports "
                              f"{target} (layer {_layer(target)})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circle():
    graph: Dict[str, Set[str]] = {}
    for path in _sources():
        src = _module_name(path)
        graph.setdefault(src, set()).update(t for t, _, _ in _imports(path) if t != src)
    # Tarjan's strongly connected components; a package's __init__ re-exporting its own
    # modules is not a circle unless a module imports the package back.
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    circles: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    import sys
    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_function_local_imports_only_in_cli_or_explained():
    """A project import inside a function hides an edge of the graph; outside the CLI each one
    says why on its own line or the line above (e.g. an optional dependency, or a cycle with torch)."""
    hidden = []
    for path in _sources():
        src = _module_name(path)
        if _layer(src) >= LAYERS["cli"]:
            continue
        lines = path.read_text().splitlines()
        for target, line, nested in _imports(path):
            if not nested:
                continue
            here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here.strip()}")
    assert not hidden, "function-local project imports without a reason:\n" + "\n".join(sorted(set(hidden)))


def test_packages_say_what_they_own():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80 and "import" in doc.lower(), f"{init}: docstring must say what it owns and may import"
