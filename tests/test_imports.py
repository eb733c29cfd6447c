"""No import cycles among ray_ckpt's modules, and every module imports in a fresh interpreter.

The graph is built from the source with ``ast``: every ``import ray_ckpt...`` / ``from ray_ckpt...
import ...`` at the top of a module and inside its functions (a function-level import is a cycle
hidden until the function runs). Imports under ``if TYPE_CHECKING:`` are annotations, never
executed, and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_ckpt"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ray_ckpt modules ``name`` imports at runtime (top level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    # importing a submodule runs its package's __init__ first: that edge is implied, not a cycle
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in parents}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles() -> None:
    modules = _modules()
    assert {"ray_ckpt.core.store", "ray_ckpt.core.byo", "ray_ckpt.interop.artifact", "ray_ckpt.interop.legacy"} <= set(
        modules
    )
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "ray_ckpt.core.byo" in graph["ray_ckpt.core.store"]  # store -> byo at the top, and never back
    assert "ray_ckpt.interop.legacy" in graph["ray_ckpt.interop.artifact"]
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = sorted(_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _raw_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports anywhere (functions and TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_core_and_tiers_never_import_ray_nor_the_ray_layer() -> None:
    """Persistence and tiers sit below the Ray layer: not even a lazy import of ray or ray_ckpt.distributed
    (the Ray layer hands its observers in, see ray_ckpt.core.hooks)."""
    modules = _modules()
    below = [name for name in modules if name.startswith(("ray_ckpt.core", "ray_ckpt.tiers"))]
    assert "ray_ckpt.core.store" in below and "ray_ckpt.tiers.remote" in below
    bad = []
    for name in below:
        for imported in sorted(_raw_imports(modules[name]) | _imports(name, modules[name], modules)):
            if imported == "ray" or imported.startswith(("ray.", "ray_ckpt.distributed")):
                bad.append(f"{modules[name].relative_to(PACKAGE.parent)}: imports {imported}")
    assert not bad, "\n".join(bad)
