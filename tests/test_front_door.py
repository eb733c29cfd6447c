"""The top-level ``ray_ckpt`` package is the front door only: users import from it, the package's
own modules never do (they import the module that defines a name), and ``import ray_ckpt`` stays
light (each name is imported on first use)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_ckpt"


def _front_door_imports(path: Path) -> list[str]:
    """``import ray_ckpt`` / ``from ray_ckpt import X`` in a module, as ``line: statement``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and any(alias.name == "ray_ckpt" for alias in node.names):
            found.append(f"{node.lineno}: import ray_ckpt")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "ray_ckpt":
            found.append(f"{node.lineno}: from ray_ckpt import {', '.join(a.name for a in node.names)}")
    return found


def test_no_module_of_the_package_imports_the_front_door() -> None:
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{hit}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py"
        for hit in _front_door_imports(path)
    ]
    assert not violations, "import the defining module instead:\n" + "\n".join(violations)


def test_the_finder_sees_both_spellings(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nimport ray_ckpt\n\ndef f():\n    from ray_ckpt import CheckpointStore, Shard\n")
    assert _front_door_imports(module) == ["2: import ray_ckpt", "5: from ray_ckpt import CheckpointStore, Shard"]


def test_every_exported_name_resolves_to_its_defining_module_and_import_stays_light() -> None:
    code = (
        "import sys\n"
        "import ray_ckpt\n"
        "heavy = [m for m in ('torch', 'ray', 'pydantic', 'rich') if m in sys.modules]\n"
        "print('heavy', heavy)\n"
        "for name in ray_ckpt.__all__:\n"
        "    value = getattr(ray_ckpt, name)\n"
        "    where = ray_ckpt._LAZY.get(name)\n"
        "    if where is not None and getattr(value, '__module__', where) != where:\n"
        "        print('misplaced', name, value.__module__, where)\n"
        "print('ok', len(ray_ckpt.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "heavy []", lines  # import ray_ckpt imports neither torch, Ray, pydantic nor rich
    assert lines[1].startswith("ok "), lines  # every name resolves, each from the module the table names
