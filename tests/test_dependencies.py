"""Every third-party import of the package is declared in pyproject.toml.

A module imported at a module's top level must be a dependency (a plain ``pip install`` gives it);
one imported only inside a function or an ``ImportError`` guard may be an optional extra instead
(``plot`` for matplotlib). Import names are mapped to distributions through the installed
packages' metadata (``yaml`` is PyYAML).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_ckpt"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """{top-level import name: {module path: imported unconditionally at the module's top level}}."""
    found: dict[str, dict[str, bool]] = {}

    def visit(node: ast.AST, path: str, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root == "ray_ckpt":
                    continue
                modules = found.setdefault(root, {})
                modules[path] = modules.get(path, False) or top
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try, ast.If))
            visit(child, path, top and not nested)

    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        visit(ast.parse(path.read_text(), filename=rel), rel, True)
    return found


def _distribution(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name)
    assert dists, f"import {import_name!r}: no installed distribution provides it (declare and install it)"
    return _normalize(dists[0])


def test_every_import_of_the_package_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    imports = _third_party_imports()
    assert {"torch", "ray", "rich", "pydantic"} <= set(imports), sorted(imports)  # the scan sees the imports

    missing = []
    for name, modules in sorted(imports.items()):
        dist = _distribution(name)
        at_top = sorted(path for path, top in modules.items() if top)
        if at_top and dist not in required:
            missing.append(f"{name} ({dist}): imported at the top of {', '.join(at_top)}; not in dependencies")
        elif dist not in required | extras:
            missing.append(f"{name} ({dist}): imported in {', '.join(sorted(modules))}; not declared at all")
    assert not missing, "undeclared imports in pyproject.toml:\n" + "\n".join(missing)


def test_the_scan_tells_top_level_from_lazy_imports() -> None:
    imports = _third_party_imports()
    assert imports["torch"]["ray_ckpt/core/store.py"] is True
    assert imports["rich"]["ray_ckpt/cli/render.py"] is False  # imported where the CLI draws a table
    assert imports["ray"]["ray_ckpt/distributed/handle.py"] is True  # subpackages are scanned too
    assert set(imports["matplotlib"].values()) == {False}  # plot only: the `plot` extra


def test_every_folder_of_the_package_is_a_package() -> None:
    """setuptools' ``packages.find`` ships only folders with an ``__init__.py``: a subpackage without
    one would be missing from the wheel (and its imports from the scan above would not matter)."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"folders without __init__.py: {missing}"
    assert {"core", "tiers", "distributed", "adapters", "interop", "cli"} <= {
        f.name for f in folders if f.parent == PACKAGE
    }
