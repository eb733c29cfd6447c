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
    found = {target for _, _, targets in _import_statements(name, path) for target in targets}
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


# ---------------------------------------------------------------------------------------------
# Layers: imports run one way, core -> tiers -> distributed -> interop -> adapters -> cli -> demo.
# ---------------------------------------------------------------------------------------------
LAYERS = ("core", "tiers", "distributed", "interop", "adapters", "cli", "demo")
RAY_FREE = ("core", "tiers")  # persistence never imports Ray, not even lazily inside a function


def _layer(module: str) -> str | None:
    """The layer a ``ray_ckpt`` module belongs to; None for the front door (``ray_ckpt``, ``__main__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _import_statements(name: str, path: Path) -> list[tuple[int, str, set[str]]]:
    """(line, statement text, absolute module names it names) for every runtime import of module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str, set[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.append((child.lineno, ast.unparse(child), {a.name for a in child.names}))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = {base} | {f"{base}.{a.name}" for a in child.names}
                found.append((child.lineno, ast.unparse(child), names))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _violations(modules: dict[str, Path]) -> list[str]:
    """Every import that runs up a layer, reaches Ray from persistence, goes through the front door, or
    takes another module's private (underscore) name: what a module offers others is its public names."""
    found: list[str] = []
    for name, path in sorted(modules.items()):
        layer = _layer(name)
        if layer is None:
            continue  # the front door may name everything (lazily)
        rank = LAYERS.index(layer)
        where = name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for line, text, targets in _import_statements(name, path):
            for target in sorted(targets):
                top = target.split(".")[0]
                if layer in RAY_FREE and top == "ray":
                    found.append(f"{where}:{line}: {text}  ({layer} never imports Ray)")
                    break
                if top != "ray_ckpt":
                    continue
                if target == "ray_ckpt" and layer != "demo":
                    found.append(f"{where}:{line}: {text}  (the front door is for users; import the defining module)")
                    break
                other = _layer(target) if target in modules or target.rpartition(".")[0] in modules else None
                if other is not None and LAYERS.index(other) > rank:
                    found.append(f"{where}:{line}: {text}  ({layer} must not import {other})")
                    break
                owner, _, leaf = target.rpartition(".")
                if owner in modules and owner != name and leaf.startswith("_") and target not in modules:
                    found.append(f"{where}:{line}: {text}  ({leaf} is private to {owner})")
                    break
    return found


def test_imports_run_down_the_layers_only() -> None:
    modules = _modules()
    assert {_layer(m) for m in modules} >= set(LAYERS), "every layer is a subpackage"
    violations = _violations(modules)
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_the_layer_check_names_the_file_and_the_import(tmp_path: Path) -> None:
    """A core module that imports Ray lazily, or a tier module, is reported with its file and line."""
    bad = tmp_path / "_layer_probe_tmp.py"
    bad.write_text(
        "def f():\n    import ray\n    from ray_ckpt.tiers import tiered\n"
        "    from ray_ckpt.core.store import _private\n    return ray, tiered, _private\n"
    )
    violations = [v for v in _violations({**_modules(), "ray_ckpt.core._layer_probe_tmp": bad}) if "_probe" in v]
    assert violations == [
        "ray_ckpt/core/_layer_probe_tmp.py:2: import ray  (core never imports Ray)",
        "ray_ckpt/core/_layer_probe_tmp.py:3: from ray_ckpt.tiers import tiered  (core must not import tiers)",
        "ray_ckpt/core/_layer_probe_tmp.py:4: from ray_ckpt.core.store import _private  (_private is private to "
        "ray_ckpt.core.store)",
    ]


def test_the_top_of_the_package_is_the_front_door_only() -> None:
    """At most ten modules sit at the top of ``ray_ckpt/``; every role lives in its layer's folder."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), folders
