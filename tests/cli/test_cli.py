"""The ray-ckpt command line, run in-process through main() and once as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ray_ckpt import CheckpointManager, CheckpointStore
from ray_ckpt.cli.commands import parse_storage_options
from ray_ckpt.cli.main import main
from ray_ckpt.interop.mock import TinyPolicy

LOSSES = {1: 0.9, 2: 0.2, 3: 0.6, 4: 0.4, 5: 0.7, 6: 0.8}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run(tmp_path: Path) -> str:
    """A run of six checkpoints ranked by loss (min), keeping the top 2 (+ the latest)."""
    uri = str(tmp_path / "runs" / "exp")
    model = TinyPolicy()
    with CheckpointManager(uri, max_to_keep=None, best_fn="loss", async_save=False) as mgr:
        mgr.store.write_architecture(model, {"obs_dim": 4, "hidden": 8, "num_actions": 2})
        for step, loss in LOSSES.items():
            mgr.save(step, {"model": model, "epoch": step}, metrics={"loss": loss, "reward": 10 * step})
    return uri


def test_ls_human_and_json(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = CheckpointStore(os.path.dirname(run), "exp")
    store.acquire_lease(3, ttl_s=60)
    code, out, err = run_cli(capsys, "ls", run)
    assert code == 0 and err == ""
    assert "6 checkpoint(s); ranked by loss (min)" in out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "best" in lines["2"] and "leased" in lines["3"] and "loss=0.9" in lines["1"]
    code, out, _ = run_cli(capsys, "ls", run, "--json", "--keep-top-k", "2")
    data = json.loads(out)
    marks = {c["step"]: (c["kept"], c["best"], c["leased"]) for c in data["checkpoints"]}
    # top-2 by loss are 2 and 4, the latest (6) is always kept, and 3 is leased
    assert marks == {
        1: (False, False, False),
        2: (True, True, False),
        3: (True, False, True),
        4: (True, False, False),
        5: (False, False, False),
        6: (True, False, False),
    }
    assert data["checkpoints"][0]["files_size"] > 0 and data["checkpoints"][0]["metrics"]["reward"] == 10


def test_best(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "best", run, "-k", "3", "--json")
    assert code == 0 and [r["step"] for r in json.loads(out)["checkpoints"]] == [2, 4, 3]
    code, out, _ = run_cli(capsys, "best", run, "--metric", "reward", "--mode", "max")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["1", "6", "60"]


def test_best_needs_a_metric_when_the_run_records_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CheckpointStore(str(tmp_path), "plain").save(1, {"w": torch.ones(1)}, {"loss": 1.0})
    code, out, err = run_cli(capsys, "best", str(tmp_path / "plain"))
    assert code == 2 and out == "" and "--metric" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(capsys, "best", str(tmp_path / "plain"), "--metric", "loss")
    assert code == 0 and "step_000000001" in out


def test_inspect_run_checkpoint(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", f"{run}:best")
    assert code == 0
    assert "run / step   exp / 2" in out and "ray_ckpt.interop.mock.TinyPolicy" in out
    assert "loss=0.2" in out
    assert any(line.split()[:3] == ["body.weight", "F32", "8x4"] for line in out.splitlines())
    code, out, _ = run_cli(capsys, "inspect", f"{run}/checkpoints/step_000000004", "--json")
    data = json.loads(out)
    assert data["step"] == 4 and data["metrics"]["loss"] == 0.4
    assert {t["key"]: (t["dtype"], t["shape"], t["nbytes"]) for t in data["tensors"]}["head.weight"] == (
        "F32",
        [2, 8],
        64,
    )
    assert data["architecture"]["config"] == {"obs_dim": 4, "hidden": 8, "num_actions": 2}
    assert "model.safetensors" in data["files"]


def test_inspect_legacy_and_mock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"a": torch.zeros(2, 3, dtype=torch.float16)}, str(tmp_path / "pol_7.safetensors"))
    (tmp_path / "pol_7.metrics.json").write_text(json.dumps({"score": 3}))
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "pol_7.safetensors"), "--json")
    data = json.loads(out)
    assert code == 0 and data["tensors"][0]["shape"] == [2, 3] and data["tensors"][0]["dtype"] == "F16"
    assert data["metrics"] == {"score": 3.0}
    torch.save({"x": torch.ones(5)}, tmp_path / "r:v2.pt")
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "r:v2.pt"))
    assert code == 0 and "r / 2" in out and "legacy (metta)" in out
    code, out, _ = run_cli(capsys, "inspect", "mock://tiny", "--json")
    assert code == 0 and json.loads(out)["architecture"]["class_path"] == "ray_ckpt.interop.mock.TinyPolicy"


def test_verify_ok_then_corrupt(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 0 and "6 ok, 0 corrupt" in out
    shard = Path(run) / "checkpoints" / "step_000000003" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip a bit of a tensor: same size, different checksum
    shard.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "verify", run, "--json")
    result = json.loads(out)
    assert code == 1 and not result["ok"]
    bad = [r for r in result["results"] if not r["ok"]]
    assert [r["step"] for r in bad] == [3] and "checksum mismatch" in bad[0]["error"]
    assert run_cli(capsys, "verify", f"{run}:v4")[0] == 0
    code, out, _ = run_cli(capsys, "verify", f"{run}:v3")
    assert code == 1 and "CORRUPT" in out and "model.safetensors" in out


def test_verify_reports_an_unreadable_marker(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    (Path(run) / "checkpoints" / "step_000000005" / "checkpoint.json").write_text("{not json")
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 1 and "step_000000005" in out and "1 corrupt" in out


def test_gc_dry_run_then_real(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    leftover = Path(run) / "checkpoints" / "step_000000099"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    code, out, _ = run_cli(capsys, "gc", run, "--dry-run", "--keep-last-n", "2", "--json")
    data = json.loads(out)
    assert code == 0 and data["leftovers"] == ["checkpoints/step_000000099"]
    # keep the last 2 (5, 6); the run records no keep_top_k, so 1-4 would go: gc only shows that
    assert data["retention_would_delete"] == [1, 2, 3, 4]
    assert leftover.exists()
    code, out, _ = run_cli(capsys, "gc", run)
    assert code == 0 and "removed 1 uncommitted leftover(s)" in out and "would delete nothing" in out
    assert not leftover.exists()
    assert len(CheckpointStore(os.path.dirname(run), "exp").list()) == 6


def test_gc_apply_retention(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "gc", run, "--keep-last-n", "2", "--apply-retention", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and data["retention_would_delete"] == [1, 2, 3, 4] and data["retention_deleted"] == []
    assert len(CheckpointStore(os.path.dirname(run), "exp").list()) == 6  # a dry run deletes nothing
    code, out, _ = run_cli(capsys, "gc", run, "--keep-last-n", "2", "--apply-retention")
    assert code == 0 and "retention deleted steps [1, 2, 3, 4]" in out
    assert [i.step for i in CheckpointStore(os.path.dirname(run), "exp").list()] == [5, 6]
    code, out, _ = run_cli(capsys, "gc", run, "--keep-last-n", "2", "--apply-retention")
    assert code == 0 and "retention would delete nothing" in out


def _rows(out: str) -> dict[int, list[str]]:
    """``ray-ckpt retention``'s table: step -> [action, kept by, metric]."""
    return {int(line.split()[0]): line.split()[1:] for line in out.splitlines()[2:-1]}


def test_retention_dry_run_by_default_then_apply(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = CheckpointStore(os.path.dirname(run), "exp")
    store.acquire_lease(3, ttl_s=60)
    code, out, err = run_cli(capsys, "retention", run, "--keep-top-k", "2")
    assert code == 0 and err == ""
    assert "keep_top_k=2" in out.splitlines()[0]
    rows = _rows(out)
    assert {step: row[:2] for step, row in rows.items()} == {
        1: ["delete", "-"],
        2: ["keep", "top-k"],
        3: ["keep", "leased"],
        4: ["keep", "top-k"],
        5: ["delete", "-"],
        6: ["keep", "latest"],
    }
    assert rows[2][2] == "0.2"  # the ranking metric
    assert out.splitlines()[-1] == "would delete 2 step(s): [1, 5] (dry run; pass --apply to delete)"
    assert len(CheckpointStore(os.path.dirname(run), "exp").list()) == 6

    code, out, _ = run_cli(capsys, "retention", run, "--keep-top-k", "2", "--keep-period", "3", "--json")
    data = json.loads(out)
    assert code == 0 and data["dry_run"] and data["would_delete"] == [1, 5] and data["deleted"] == []
    assert {r["step"]: r["reasons"] for r in data["steps"]} == {
        1: [],
        2: ["top-k"],
        3: ["leased", "period"],
        4: ["top-k"],
        5: [],
        6: ["latest", "period"],
    }
    assert data["policy"]["keep_top_k"] == 2 and data["policy"]["metric_name"] == "loss"

    code, out, _ = run_cli(capsys, "retention", run, "--keep-top-k", "2", "--apply", "--json")
    data = json.loads(out)
    assert code == 0 and not data["dry_run"] and data["deleted"] == [1, 5]
    assert {r["step"]: r["action"] for r in data["steps"]}[1] == "deleted"
    assert [i.step for i in CheckpointStore(os.path.dirname(run), "exp").list()] == [2, 3, 4, 6]
    code, out, _ = run_cli(capsys, "retention", run, "--keep-top-k", "2")
    assert code == 0 and out.splitlines()[-1] == "nothing to delete"


def test_retention_shows_the_recorded_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = CheckpointStore(str(tmp_path), "w", metric_name="loss", keep_top_k=1, keep_checkpoints_without_metrics=True)
    for step, loss in ((1, 0.5), (2, None), (3, 0.2), (4, None)):
        store.save(step, {"w": torch.ones(1)}, metrics={} if loss is None else {"loss": loss})
    code, out, _ = run_cli(capsys, "retention", str(tmp_path / "w"), "--json")
    data = json.loads(out)
    assert code == 0 and data["policy"]["keep_checkpoints_without_metrics"] is True
    assert {r["step"]: r["reasons"] for r in data["steps"]} == {
        2: ["no-metric"],
        3: ["top-k"],
        4: ["latest", "no-metric"],
    }
    assert data["would_delete"] == []
    code, out, _ = run_cli(capsys, "retention", str(tmp_path / "w"))
    assert code == 0 and out.splitlines()[-1] == "nothing to delete"
    # without a rule that deletes, every step is kept and the command says why nothing goes
    CheckpointStore(str(tmp_path), "plain").save(1, {"w": torch.ones(1)})
    code, out, _ = run_cli(capsys, "retention", str(tmp_path / "plain"))
    assert code == 0 and _rows(out)[1][:2] == ["keep", "latest,no-deleting-rule"]
    assert out.splitlines()[-1] == "nothing to delete (neither keep_top_k nor keep_last_n is set)"


def test_retention_refuses_an_option_that_means_nothing(run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "retention", run, "--keep-checkpoints-without-metrics")
    assert code == 2 and out == "" and "keep_checkpoints_without_metrics" in err
    assert len(err.strip().splitlines()) == 1


def test_migrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "old", tmp_path / "runs"
    src.mkdir()
    torch.save({"w": torch.ones(2)}, src / "agent:v3.pt")
    torch.save({"w": torch.zeros(2)}, src / "agent:v7.pt")
    code, out, _ = run_cli(capsys, "migrate", str(src), str(dst), "--dry-run")
    assert code == 0 and not dst.exists()
    assert [line.split("  ")[0].strip() for line in out.splitlines()[:2]] == ["would migrate"] * 2
    code, out, _ = run_cli(capsys, "migrate", str(src), str(dst))
    assert code == 0 and "2 migrated" in out
    assert [line.split()[0] for line in out.splitlines()[:2]] == ["migrated"] * 2
    assert [i.step for i in CheckpointStore(str(dst), "agent").list()] == [3, 7]
    code, out, _ = run_cli(capsys, "migrate", str(src), str(dst), "--json")
    assert code == 0 and {i["action"] for i in json.loads(out)["items"]} == {"skipped"}
    (src / "junk.pt").write_bytes(b"junk")
    code, out, _ = run_cli(capsys, "migrate", str(src), str(dst))
    assert code == 1 and "failed" in out and "junk.pt" in out


def test_plot(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "loss.png"
    code, out, _ = run_cli(capsys, "plot", run, "--metric", "loss", "-o", str(output), "--keep-top-k", "2")
    assert code == 0 and "best step 2" in out
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 5000
    code, _, err = run_cli(capsys, "plot", run, "--metric", "nope", "-o", str(output))
    assert code == 1 and "nope" in err


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["ls", "{tmp}/missing"], 1, "no run at"),
        (["inspect", "{tmp}/missing:latest"], 1, "no run"),
        (["ls", "s3://"], 2, "no run name"),
        (["best", "{tmp}/r:sometimes"], 2, "bad selector"),
        (["inspect", "{tmp}/corrupt.pt"], 1, "corrupt.pt"),
        (["verify", "{tmp}/corrupt.pt"], 1, None),
        (["inspect", "{tmp}/pickled.pt"], 1, "trust_pickle"),
        (["ls", "mock://tiny"], 2, "run URI"),
    ],
)
def test_errors_are_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needle: str | None
) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    torch.save(TinyPolicy(), tmp_path / "pickled.pt")
    got, out, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == code
    if needle is None:  # verify reports corruption as its result, not as an error
        assert "CORRUPT" in out and "corrupt.pt" in out
        return
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    assert main(["best", "x", "-k", "zero"]) == 2


def test_parse_storage_options() -> None:
    options = parse_storage_options(
        ["key=abc", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "anon=false", "client_kwargs.retries=3"],
        env='{"secret": "s", "key": "from-env"}',
    )
    assert options == {
        "secret": "s",
        "key": "abc",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "retries": 3},
    }


def test_ls_on_s3_with_storage_options(
    s3_bucket: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    store = CheckpointStore(f"{bucket}/runs", "exp", options)
    store.save(3, {"w": torch.ones(2)}, {"loss": 0.5})
    kwargs = options["client_kwargs"]
    code, out, err = run_cli(
        capsys,
        "ls",
        f"{bucket}/runs/exp",
        "--json",
        "--storage-option",
        f"key={options['key']}",
        "--storage-option",
        f"secret={options['secret']}",
        "--storage-option",
        f"client_kwargs.endpoint_url={kwargs['endpoint_url']}",
        "--storage-option",
        f"client_kwargs.region_name={kwargs['region_name']}",
    )
    assert code == 0, err
    assert [c["step"] for c in json.loads(out)["checkpoints"]] == [3]
    monkeypatch.setenv("RAY_CKPT_STORAGE_OPTIONS", json.dumps(options))
    code, out, _ = run_cli(capsys, "inspect", f"{bucket}/runs/exp:latest", "--json")
    assert code == 0 and json.loads(out)["tensors"][0]["key"] == "w"


def test_console_script_in_a_real_process(run: str) -> None:
    script = Path(sys.executable).with_name("ray-ckpt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ray_ckpt.cli.main"]
    done = subprocess.run([*cmd, "ls", run, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["checkpoints"]) == 6


def _real_process(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ray_ckpt", *argv], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_version_and_python_dash_m(run: str) -> None:
    from importlib.metadata import version

    done = _real_process("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ray-ckpt {version('ray-ckpt')}"
    done = _real_process("ls", run, "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["checkpoints"]) == 6


def test_errors_under_json_are_json_with_the_same_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "ls", str(tmp_path / "missing"), "--json")
    assert code == 1 and err == ""
    assert json.loads(out) == {
        "error": f"no run at file://{tmp_path}/missing",
        "type": "CheckpointNotFoundError",
        "exit_code": 1,
    }
    code, out, _ = run_cli(capsys, "best", f"{tmp_path}/r:sometimes", "--json")
    assert code == 2 and json.loads(out)["type"] == "ConfigError" and "bad selector" in json.loads(out)["error"]
    code, out, _ = run_cli(capsys, "best", "x", "-k", "zero", "--json")  # an argparse error
    assert code == 2 and json.loads(out)["type"] == "UsageError" and "invalid int value" in json.loads(out)["error"]
    code, out, err = run_cli(capsys, "best", "x", "-k", "zero")  # without --json: usage on stderr
    assert code == 2 and out == "" and "usage:" in err and "invalid int value" in err


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGPIPE"), reason="POSIX pipes")
def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "many")
    for step in range(1, 6):
        store.save(step, {"w": torch.ones(1)}, {"loss": 1.0 / step})
    # `true` exits at once, long before the interpreter has started: every write meets a closed pipe
    for extra in ("", " --json"):
        cmd = f"set -o pipefail; {sys.executable} -m ray_ckpt ls {tmp_path / 'many'}{extra} | true"
        done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert done.stderr == "" and done.returncode == 141, (done.returncode, done.stderr)
    # in-process (no SIGPIPE reset): BrokenPipeError is caught, stdout silenced, 141 returned
    code = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -c 'import sys; from ray_ckpt.cli.main import main; "
            f'sys.exit(main(["ls", "{tmp_path / "many"}"]))\' | true; echo ${{PIPESTATUS[0]}}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert code.stderr == "" and code.stdout.strip() == "141", (code.stdout, code.stderr)


def test_ls_on_a_storage_root_lists_its_runs(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    CheckpointStore(str(root), "other").save(4, {"w": torch.ones(1)})
    (root / "not-a-run").mkdir()
    code, out, err = run_cli(capsys, "ls", str(root))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == f"storage file://{root}: 2 run(s)"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"exp", "other"} and rows["exp"][:3] == ["6", "6", "2"] and rows["other"][:3] == ["1", "4", "-"]
    code, out, _ = run_cli(capsys, "ls", str(root), "--json")
    data = json.loads(out)
    assert [r["run"] for r in data["runs"]] == ["exp", "other"] and data["runs"][0]["best_step"] == 2
    code, _, err = run_cli(capsys, "ls", str(root / "not-a-run"))  # an empty directory: no run, no runs
    assert code == 0 and "0 checkpoint(s)" in _


def test_help_gives_the_selector_grammar_and_the_docstring_only_real_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray_ckpt.cli.main as cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    commands = set(sub.choices)
    assert {"import", "export", "download"} <= commands
    listed = set(re.findall(r"``([a-z]+)``", cli.__doc__.split("Commands:", 1)[1].split("\n\n", 1)[0]))
    assert listed == commands  # every command the docstring names exists, and every command is named
    for command in ("export", "download", "verify", "cp", "inspect"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert ":best" in text and ":vN" in text and ":step_N" in text and ":latest" in text, command
    for command in ("ls", "best", "gc", "retention", "plot"):  # whole-run commands take no selector
        assert main([command, "--help"]) == 0
        assert "no selector" in " ".join(capsys.readouterr().out.split()), command


def test_download_copies_a_step_verified(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "copy"
    code, out, _ = run_cli(capsys, "download", f"{run}:best", str(dest), "--json")
    assert code == 0
    payload = json.loads(out)
    step_dir = Path(run) / "checkpoints" / "step_000000002"
    on_storage = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
    # the step's files and marker, and the run's architecture (an import of the folder keeps it)
    assert payload["step"] == 2 and set(payload["files"]) == on_storage | {"model_architecture.json"}
    for name in on_storage:
        assert (dest / name).read_bytes() == (step_dir / name).read_bytes(), name
    # a shard changed on storage after its commit: the copy is refused and removed
    shard = Path(run) / "checkpoints" / "step_000000004" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "download", f"{run}:v4", str(tmp_path / "bad"))
    assert code == 1 and "model.safetensors" in err and "checksum" in err
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    assert run_cli(capsys, "download", f"{run}:v3", str(dest))[0] == 2  # not empty, no --overwrite


def test_terminal_output_uses_rich_tables_and_progress(run: str) -> None:
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    with subprocess.Popen(
        [sys.executable, "-m", "ray_ckpt", "verify", run], stdout=follower, stderr=follower, env=env
    ) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "6 ok, 0 corrupt" in text
    assert "verify" in text and "kB" in text and "/s" in text  # rich's bytes and rate columns
