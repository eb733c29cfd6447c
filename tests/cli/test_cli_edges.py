"""The command line's edges: start-up without torch, help and usage text, one JSON shape per
answer, verify of things that are no run, selectors, ``cp``, ``download`` then ``import``,
shell completion and a missing-credentials error on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.cli.main import build_parser, completion_script
from ray_ckpt.core.layout import MARKER_FILE
from tests.cli.test_cli import run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path: Path) -> str:
    """A run with an architecture, trainer state, metadata and an eval score on step 40."""
    store = CheckpointStore(str(tmp_path / "src"), run_name="exp", metric_name="loss", mode="min")
    model = torch.nn.Linear(4, 2)
    store.write_architecture(model, {"in_features": 4, "out_features": 2})
    for step in (10, 40):
        store.save(step, model.state_dict(), metrics={"loss": 1 / step}, metadata={"note": f"s{step}"},
                   trainer_state={"step": step, "opt": {"m": torch.full((3,), float(step))}})  # fmt: skip
    store.report_eval(40, {"eval/return": 7.0})
    return str(tmp_path / "src" / "exp")


def _same_step(src: CheckpointStore, dst: CheckpointStore, step: int) -> None:
    a, b = src.info(step), dst.info(step)
    assert (b.step, b.metrics, b.metadata, b.world_size) == (a.step, a.metrics, a.metadata, a.world_size)
    assert b.metrics["eval/return"] == 7.0
    for key, value in src.load(step).items():
        assert torch.equal(dst.load(step)[key], value), key
    assert torch.equal(dst.load_trainer_state(step)["opt"]["m"], src.load_trainer_state(step)["opt"]["m"])
    assert dst.read_architecture().class_path == src.read_architecture().class_path
    dst.verify(step)


# -- start-up -----------------------------------------------------------------------------------
PROBE = (
    "import sys, time; t = time.perf_counter(); from ray_ckpt.cli.main import main; rc = main(sys.argv[1:]); "
    "torch = sys.modules.get('torch'); "
    "loaded = torch is not None and (type(torch).__name__ != '_Deferred' or '_deferred_real' in vars(torch)); "
    "print('PROBE', rc, loaded, 'ray' in sys.modules, round(time.perf_counter() - t, 3), file=sys.stderr)"
)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["ls", "{run}"], ["ls", "{run}", "--json"]])
def test_help_version_and_ls_never_import_torch_or_ray(run: str, argv: list[str]) -> None:
    """What made them take seconds: torch, imported by the modules a listing goes through (and Ray:
    only ``ls --address`` asks a live checkpointer)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *(a.format(run=run) for a in argv)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    probe = next(line for line in out.stderr.splitlines() if line.startswith("PROBE")).split()
    assert probe[1:4] == ["0", "False", "False"], out.stdout[-2000:] + out.stderr[-3000:]


def test_inspect_still_gets_torch_when_it_needs_it(run: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "inspect", f"{run}:v40", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "PROBE 0 " in out.stderr, out.stderr[-3000:]
    assert json.loads(out.stdout)["step"] == 40


def test_version_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--version", "--json")
    assert code == 0 and json.loads(out)["name"] == "ray-ckpt" and json.loads(out)["version"]
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("ray-ckpt ")


# -- help and usage -----------------------------------------------------------------------------
def _commands() -> dict[str, Any]:
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_help_starts_with_what_it_does(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    summary = next(a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions if a.dest == command)
    code, out, _ = run_cli(capsys, command, "-h")
    first = out.split("\n\n")[1].strip()  # the paragraph after the usage lines
    assert code == 0 and first.startswith(summary[0].upper() + summary[1:] + "."), (summary, first)


def test_a_usage_error_names_the_program_once(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, _, err = run_cli(capsys, "ls", run, "extra")
    assert code == 2 and err.count("ray-ckpt") == err.count("usage: ray-ckpt") + 1, err
    assert err.splitlines()[-1] == "ray-ckpt: error: unrecognized arguments: extra"
    code, _, err = run_cli(capsys, "best", run, "-k", "zero")
    assert code == 2 and err.splitlines()[-1].startswith("ray-ckpt best: error: argument -k: invalid int")
    assert "ray-ckpt best: error: ray-ckpt" not in err


# -- JSON shapes, verify, selectors, plot ------------------------------------------------------
def test_best_is_an_object_and_verify_names_uris(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "best", run, "-k", "2", "--json")
    best = json.loads(out)
    assert code == 0 and isinstance(best, dict) and best["metric_name"] == "loss" and best["mode"] == "min"
    assert [c["step"] for c in best["checkpoints"]] == [40, 10] and best["run"].endswith("/src/exp")
    code, out, _ = run_cli(capsys, "verify", run, "--json")
    results = json.loads(out)["results"]
    assert code == 0 and all("uri" in r and "target" not in r for r in results), results


def test_verify_of_what_is_no_run_is_an_error(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('hi')\n")
    for target, says in [
        (str(tmp_path / "src"), "a storage root holding 1 run(s) (exp)"),
        (str(tmp_path / "empty"), "not a run, a step or a checkpoint"),
        (str(tmp_path / "code"), "not a run, a step or a checkpoint"),
        (str(tmp_path / "nowhere"), "no such run"),
    ]:
        code, out, err = run_cli(capsys, "verify", target)
        assert code == 1 and says in err and "0 corrupt" not in out, (target, out, err)
    assert run_cli(capsys, "verify", run)[0] == 0


@pytest.mark.parametrize("command", ["ls", "best", "gc", "retention", "plot"])
def test_whole_run_commands_refuse_a_selector(
    command: str, run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["-o", str(tmp_path / "p.png")] if command == "plot" else []
    for uri in (f"{run}:best", f"{run}:v10", f"{run}/checkpoints/step_000000010"):
        code, _, err = run_cli(capsys, command, uri, *extra)
        assert code == 2 and "names one checkpoint" in err, (uri, err)


def test_plot_defaults_to_the_run_metric(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "loss.png"
    code, out, _ = run_cli(capsys, "plot", run, "-o", str(out_png), "--json")
    assert code == 0 and json.loads(out)["best_step"] == 40 and out_png.stat().st_size > 0


# -- cp, download then import, migrate of a downloaded step ------------------------------------
def test_cp_copies_a_step_between_storages(
    run: str, tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, options = s3_bucket
    opts = [f"--storage-option={k}={json.dumps(v)}" for k, v in options.items()]
    src = CheckpointStore(str(tmp_path / "src"), run_name="exp")
    code, out, err = run_cli(capsys, "cp", f"{run}:v40", f"{bucket}/runs/copy", "--json", *opts)
    assert code == 0, err
    assert json.loads(out)["step"] == 40 and json.loads(out)["uri"].endswith("/copy/checkpoints/step_000000040")
    on_s3 = CheckpointStore(f"{bucket}/runs", run_name="copy", storage_options=options)
    _same_step(src, on_s3, 40)
    # and back to local disk, from S3
    code, _, err = run_cli(capsys, "cp", f"{bucket}/runs/copy:latest", str(tmp_path / "back" / "exp2"), *opts)
    assert code == 0, err
    _same_step(src, CheckpointStore(str(tmp_path / "back"), run_name="exp2"), 40)
    # the step is there: refused without --replace
    assert run_cli(capsys, "cp", f"{run}:v40", f"{bucket}/runs/copy", *opts)[0] == 2
    # a damaged source file is never copied
    shard = Path(run) / "checkpoints" / "step_000000010" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "cp", f"{run}:v10", str(tmp_path / "back" / "exp3"))
    assert code == 1 and "checksum" in err and "model.safetensors" in err
    assert 10 not in CheckpointStore(str(tmp_path / "back"), run_name="exp3")


def test_download_then_import_keeps_the_step_and_its_metadata(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dl = tmp_path / "dl"
    assert run_cli(capsys, "download", f"{run}:v40", str(dl))[0] == 0
    assert (dl / MARKER_FILE).exists() and (dl / "model_architecture.json").exists()
    code, out, err = run_cli(capsys, "import", str(dl), str(tmp_path / "dst" / "imp"), "--json")
    assert code == 0 and json.loads(out)["step"] == 40, err
    src = CheckpointStore(str(tmp_path / "src"), run_name="exp")
    _same_step(src, CheckpointStore(str(tmp_path / "dst"), run_name="imp"), 40)
    # --step renumbers; migrate of the folder commits the same step into a run named after it
    assert run_cli(capsys, "import", str(dl), str(tmp_path / "dst" / "imp"), "--step", "41")[0] == 0
    assert [i.step for i in CheckpointStore(str(tmp_path / "dst"), run_name="imp").list()] == [40, 41]
    code, out, err = run_cli(capsys, "migrate", str(tmp_path / "dl"), str(tmp_path / "mig"), "--json")
    items = json.loads(out)["items"]
    assert code == 0 and [(i["run_name"], i["step"], i["action"]) for i in items] == [("dl", 40, "migrated")], out
    _same_step(src, CheckpointStore(str(tmp_path / "mig"), run_name="dl"), 40)


# -- completion ---------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    script = tmp_path / "complete.bash"
    script.write_text(completion_script("bash"))

    def complete(*words: str) -> list[str]:
        probe = (
            f"source {script}; COMP_WORDS=(ray-ckpt {' '.join(words)}); COMP_CWORD={len(words)}; "
            "_ray_ckpt; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return [w for w in out.stdout.splitlines() if w]

    assert set(complete("")) >= {"ls", "verify", "cp", "completion", "--version", "--json"}
    assert complete("ve") == ["verify"]
    assert complete("verify", "--tr") == ["--trust-pickle"]
    assert complete("completion", "") == ["bash", "zsh"]
    assert complete("ls", "./ru") == []  # a path: bash's own file completion (complete -o default)
    zsh = completion_script("zsh")
    assert zsh.startswith("autoload -U +X compinit") and "bashcompinit" in zsh and "complete -o default" in zsh
    if shutil.which("zsh"):
        (tmp_path / "complete.zsh").write_text(zsh)
        assert subprocess.run(["zsh", "-n", str(tmp_path / "complete.zsh")], timeout=30).returncode == 0


def test_completion_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "completion", "bash")
    assert code == 0 and out == completion_script("bash")


# -- S3 without credentials ---------------------------------------------------------------------
def test_missing_s3_credentials_fail_at_once(s3_endpoint: dict[str, Any], tmp_path: Path) -> None:
    """No retry can find credentials: one attempt, not retry_timeout_s of them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PYTHONPATH=str(REPO), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ray_ckpt", "ls", "s3://bucket/runs", "-v",
         f"--storage-option=client_kwargs.endpoint_url={s3_endpoint['url']}"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 1 and "Unable to locate credentials" in out.stderr, out.stderr[-3000:]
    assert "retrying" not in out.stderr and "attempts" not in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - started < 60
