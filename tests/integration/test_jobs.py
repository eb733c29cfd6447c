"""Ray Jobs: submit cluster/train_job.py with ``ray job submit`` to a separate local head.

The head (``ray start --head`` with its dashboard and job server on loopback, its own
``--temp-dir``, every port chosen free, token auth with a private token) is a second Ray instance
beside the test session's own ``ray.init(address="local")``. (Its GCS listens on the machine's
address: Ray resolves a loopback ``--node-ip-address`` to that address on purpose.)

It is stopped precisely: ``ray start`` runs in a new process session, so its daemons share one
process group; that group, plus anything whose command line names this test's private directory
(job drivers, workers), is terminated. ``ray stop`` is never used: it kills every Ray process of
the user, the session's Ray and other users' runs included.

``ray start --temp-dir`` writes ``ray_current_cluster`` into that temp dir, not into
/tmp/ray, so a plain ``ray.init()`` elsewhere cannot attach to this head (asserted below), and
``RAY_ADDRESS`` is never set (the CLI gets ``--address``; it is even removed from its environment).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_ckpt import CheckpointStore
from ray_ckpt.core.layout import INDEX_LOG_DIR, INDEX_SNAPSHOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")
DEFAULT_ADDRESS_FILE = "/tmp/ray/ray_current_cluster"
JOB_TIMEOUT_S = 150.0


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _file_state(path: str) -> tuple[bool, float | None, str | None]:
    """Whether a file exists, its mtime and content (to show we did not touch it)."""
    try:
        return True, os.path.getmtime(path), Path(path).read_text()
    except FileNotFoundError:
        return False, None, None


class LocalHead:
    """A ``ray start --head`` instance owned by this test, with its own temp dir, ports and token."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.temp_dir = os.path.join(root, "ray")
        os.makedirs(self.temp_dir)
        (
            self.gcs_port,
            self.dashboard_port,
            self.client_port,
            self.agent_http_port,
            self.agent_grpc_port,
            self.metrics_port,
            self.runtime_env_port,
        ) = _free_ports(7)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        token_path = os.path.join(root, "auth_token")
        with open(token_path, "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
        os.chmod(token_path, 0o600)
        hidden = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")
        self.env = {k: v for k, v in os.environ.items() if k not in hidden}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0")
        self.pgid: int | None = None
        self.start_output = ""

    def start(self) -> None:
        cmd = [
            RAY_BIN,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            "--num-cpus=2",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ]
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its daemons inherit this process group: that is what we stop later
        )
        self.pgid = proc.pid
        try:
            self.start_output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.start_output, _ = proc.communicate()
            raise AssertionError(f"`ray start --head` hung for 120s:\n{self.start_output[-3000:]}") from None
        if proc.returncode != 0:
            output = self.start_output[-3000:]
            raise AssertionError(f"`ray start --head` failed ({proc.returncode}):\n{output}\n{self.logs()}")

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the ray CLI against this head."""
        return subprocess.run(
            [RAY_BIN, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def wait_for_job_server(self, timeout: float = 90) -> None:
        """Poll ``ray job list`` until the job server (dashboard + agent) answers."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.ray("job", "list", "--address", self.address, timeout=30)
            if last.returncode == 0:
                return
            time.sleep(1)
        error = last.stderr[-2000:] if last else ""
        raise AssertionError(f"job server at {self.address} never answered: {error}\n{self.logs()}")

    def logs(self, names: tuple[str, ...] = ("dashboard.log", "dashboard_agent.log", "dashboard_JobHead.log")) -> str:
        """The tails of the head's main log files (for failure messages)."""
        out = []
        logs = os.path.join(self.temp_dir, "session_latest", "logs")
        for name in names:
            path = os.path.join(logs, name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + Path(path).read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def processes(self) -> dict[int, str]:
        """Live processes of this head (pid: command line): its process group, plus anything naming our directory."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue  # a zombie is dead already
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace").replace("\0", " ")
                ours = (self.pgid is not None and os.getpgid(pid) == self.pgid) or self.root + "/" in cmdline
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
                continue
            if ours:
                found[pid] = cmdline
        return found

    def _terminate(self, pids: list[int], grace_s: float) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL whatever is left of ``pids``."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(p in self.processes() for p in pids):
                time.sleep(0.2)

    def stop(self, grace_s: float = 10) -> list[int]:
        """Terminate exactly this head's processes; returns the pids that survived.

        In ``ray stop``'s order (raylet, then the other daemons and workers, GCS last), which takes
        about 2 s; signalled all at once, raylet, GCS, monitor and runtime-env agent ignored
        SIGTERM for the whole 20 s grace period.
        """
        procs = self.processes()
        raylet = [p for p, cmd in procs.items() if "/raylet/raylet " in cmd]
        gcs = [p for p, cmd in procs.items() if "/gcs/gcs_server " in cmd]
        self._terminate(raylet, grace_s)
        self._terminate([p for p in self.processes() if p not in gcs], grace_s)
        self._terminate(list(self.processes()), grace_s)
        return list(self.processes())


def _job_status(head: LocalHead, job_id: str) -> str:
    """The job's status as `ray job status` prints it (terminal states as words, others verbatim)."""
    out = head.ray("job", "status", job_id, "--address", head.address)
    text = out.stdout + out.stderr
    final = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    if final:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[final.group(1)]
    match = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
    return match.group(1) if match else f"UNKNOWN ({text[-500:]})"


@pytest.fixture(scope="module")
def head() -> Iterator[LocalHead]:
    """One head for this module's jobs, stopped precisely at the end (never ``ray stop``).

    Its daemons, and so the jobs' drivers, have a PATH without this interpreter's directory, as a
    shell that never activated ``.venv`` would: a job whose entrypoint says ``python`` gets the
    system's, which lacks ray (what ``cluster/submit.sh`` must not rely on).
    """
    import ray

    before = _file_state(DEFAULT_ADDRESS_FILE)
    root = tempfile.mkdtemp(prefix="rck-", dir="/tmp")
    head = LocalHead(root)
    venv_bin = os.path.dirname(sys.executable)
    head.env["PATH"] = os.pathsep.join(p for p in head.env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    try:
        head.start()
        # `ray start --temp-dir` records its address in that temp dir, never in /tmp/ray
        assert Path(head.temp_dir, "ray_current_cluster").read_text().strip().endswith(f":{head.gcs_port}")
        assert _file_state(DEFAULT_ADDRESS_FILE) == before
        assert "RAY_ADDRESS" not in os.environ
        head.wait_for_job_server()
        yield head
    finally:
        survivors = head.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"head processes survived: {survivors}"
    assert not head.processes()
    assert _file_state(DEFAULT_ADDRESS_FILE) == before

    # the session's own Ray was left alone
    assert ray.is_initialized()
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42


def _check_run(storage: str, run_name: str) -> None:
    """The job's run: steps 2 and 4 committed by 2 ranks, scored, verified, the index on storage."""
    store = CheckpointStore(storage, run_name=run_name)
    infos = store.list()
    assert [i.step for i in infos] == [2, 4]  # save_interval_steps=2 over 4 steps
    assert all(i.world_size == 2 for i in infos)
    # the run index is on storage: a snapshot once compacted, else its change log (see ray_ckpt.core.layout)
    run_dir = Path(storage, run_name)
    log_dir = run_dir / INDEX_LOG_DIR
    assert (run_dir / INDEX_SNAPSHOT).exists() or (log_dir.is_dir() and any(log_dir.iterdir())), sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
    )
    for info in infos:
        store.verify(info.step)
        assert "eval/return" in info.metrics  # the job's eval actor followed the run
    assert set(store.load(4)) >= {"embed.weight", "layers.0.self_attn.in_proj_weight", "head.weight"}


def test_ray_job_submit_runs_the_training_job_and_commits_checkpoints(head: LocalHead, run_name: str) -> None:
    """`ray job submit` of cluster/train_job.py on a local head commits checkpoints and the index."""
    storage = os.path.join(head.root, "ckpt")
    job_id = f"ray-ckpt-{run_name}"
    submit = head.ray(
        "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait", "--",
        sys.executable, str(REPO / "cluster" / "train_job.py"),
        "--storage", storage, "--run-name", run_name, "--steps", "4",
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr + head.logs()

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = _job_status(head, job_id)
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        status = _job_status(head, job_id)
    logs = head.ray("job", "logs", job_id, "--address", head.address)
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}"
    assert "Top checkpoints of run" in logs.stdout
    _check_run(storage, run_name)


def test_submit_sh_works_from_a_fresh_shell(head: LocalHead, run_name: str, tmp_path: Path) -> None:
    """cluster/submit.sh as a new user runs it: no venv on PATH, RAY_AUTH_MODE unset, a relative STORAGE.

    It finds this checkout's ray CLI, turns token auth on because a token is there, runs the job
    with the checkout's interpreter (the head is on this machine), and makes STORAGE absolute:
    relative, it would land in Ray's temporary copy of the working dir.
    """
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}  # the token path stays
    env.update(RAY_ADDRESS=head.address, STORAGE="rel_ckpt", RUN_NAME=run_name)
    assert shutil.which("ray", path=env["PATH"]) != RAY_BIN
    out = subprocess.run(
        ["bash", str(REPO / "cluster" / "submit.sh"), "--steps", "4"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:] + head.logs()
    venv_python = REPO / ".venv" / "bin" / "python"
    python = venv_python if venv_python.exists() else "python"  # a checkout without .venv: the cluster's
    assert f"on {tmp_path / 'rel_ckpt'} (python: {python})" in out.stderr, out.stderr[-2000:]
    assert "succeeded" in text and "Top checkpoints of run" in out.stdout, text[-4000:]
    _check_run(str(tmp_path / "rel_ckpt"), run_name)
