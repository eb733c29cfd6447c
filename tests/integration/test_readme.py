"""The README's code blocks work as written: every ``python`` block runs, verbatim, in a fresh
interpreter (its own local Ray), with its storage in a temporary directory; the files and modules
its shell blocks name exist.

The checks after the run read what the block's actors wrote to storage: the trainers' commits and
the evaluator's score, so an example whose actors never ran (or failed) cannot pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_ckpt import CheckpointStore

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``."""
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def test_readme_python_blocks_run_as_written(tmp_path: Path, other_ray: dict[str, str]) -> None:
    """Beside another Ray on the machine (`ray start --head`, which a plain ``ray.init()`` joins):
    each block starts a local Ray of its own."""
    python = blocks("python")
    assert len(python) >= 1
    storage = tmp_path / "storage"
    storage.mkdir()
    # the other Ray is there for ray.init() to find: what the blocks must not join
    env = {k: v for k, v in other_ray.items() if k != "OTHER_RAY_ADDRESS"}
    joins = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(num_cpus=1)"], env=env, capture_output=True, text=True, timeout=120
    )
    assert joins.returncode != 0 and "must not be provided" in joins.stderr, joins.stderr[-2000:]
    env.update(RAY_CKPT_STORAGE=str(storage), RAY_DEDUP_LOGS="0")
    outputs = {}
    for i, code in enumerate(python):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(code)
        out = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"README python block {i} failed:\n{code}\n{out.stdout[-3000:]}{out.stderr[-6000:]}"
        outputs[code] = out.stdout

    # the 30-second example: the store part, then the Ray part's trainers and evaluator
    store = CheckpointStore(str(storage), run_name="run1")
    assert [i.step for i in store.list()] == [100]
    ray_run = CheckpointStore(str(storage), run_name="run2")
    infos = ray_run.list()
    # the 2 trainers committed steps 1-3; retention (keep_top_k by eval/return) keeps the latest,
    # which the evaluator scored, and no unscored step
    assert [(i.step, i.world_size, i.metrics.get("eval/return")) for i in infos] == [(3, 2, 12.5)]
    assert sorted(ray_run.load(3)) == ["bias", "weight"]
    example = next(code for code in python if "class Evaluator" in code)
    assert "[3, 3]\n[3]\n" in outputs[example]


def test_readme_shell_blocks_name_files_and_modules_that_exist() -> None:
    shell = "\n".join(blocks("bash"))
    assert shell
    for path in re.findall(r"(?:bash|\s)((?:scripts|configs|cluster)/[\w./-]+)", shell):
        assert (REPO / path).exists(), path
    for module in re.findall(r"python -m ([\w.]+)", shell):
        if module == "pytest":
            continue
        assert (REPO / (module.replace(".", "/") + ".py")).exists() or (REPO / module.replace(".", "/")).is_dir(), (
            module
        )
    for link in re.findall(r"\]\(((?:docs|benchmarks|cluster)/[^)#]+)", README.read_text()):
        assert (REPO / link).exists(), link


@pytest.mark.parametrize("doc", ["docs/CLI.md", "docs/RAY.md", "docs/MEMORY.md"])
def test_readme_links_the_cli_ray_and_memory_guides(doc: str) -> None:
    assert f"]({doc})" in README.read_text()
