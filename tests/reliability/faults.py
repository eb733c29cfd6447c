"""Fault-injection helpers for the reliability suite: deterministic states, a save-loop child that
SIGKILLs itself at the Nth storage event, run-tree inspection, a stoppable loopback S3 server and
a loopback HTTP proxy that answers chosen S3 requests with 5xx/throttling errors.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from ray_ckpt.core.storage.base import TEMP_MARKER
from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

MARKER = "checkpoint.json"
SHARD_LIMIT = 10_000  # bytes: tensors_for() then spans three model shards


# ---------------------------------------------------------------------------------------------
# Deterministic states: what step N holds is a pure function of N, so any reader can check it.
# ---------------------------------------------------------------------------------------------
def tensors_for(step: int, size: int = 64) -> dict[str, torch.Tensor]:
    """The model state saved at ``step`` (three 8 KB tensors + a bias: three shards at SHARD_LIMIT)."""
    g = torch.Generator().manual_seed(step)
    return {
        "embed.weight": torch.randn(size, 32, generator=g),
        "layer0.weight": torch.randn(size, 32, generator=g),
        "layer1.weight": torch.randn(size, 32, generator=g),
        "norm.bias": torch.full((32,), float(step)),
    }


def trainer_state_for(step: int) -> dict[str, Any]:
    """The trainer state saved at ``step``."""
    return {"step": step, "opt": {"m": torch.arange(16, dtype=torch.float32) * step, "lr": 0.1 / (step + 1)}}


def assert_state(step: int, loaded: dict[str, torch.Tensor], size: int = 64) -> None:
    """Fail unless ``loaded`` is bit-for-bit what :func:`tensors_for` gives for ``step``."""
    expected = tensors_for(step, size)
    assert sorted(loaded) == sorted(expected), f"step {step}: keys {sorted(loaded)}"
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), f"step {step}: tensor {key!r} differs from what was saved"


def assert_trainer_state(step: int, loaded: Any) -> None:
    """Fail unless ``loaded`` is what :func:`trainer_state_for` gives for ``step``."""
    expected = trainer_state_for(step)
    assert loaded["step"] == step and loaded["opt"]["lr"] == expected["opt"]["lr"], loaded
    assert torch.equal(loaded["opt"]["m"], expected["opt"]["m"]), f"step {step}: trainer tensor differs"


# ---------------------------------------------------------------------------------------------
# Inspecting a local run directory.
# ---------------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def temp_files(run_dir: Path) -> list[str]:
    """Every temporary file or directory anywhere under a run (relative paths)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if TEMP_MARKER in p.name)


def unmarked_step_dirs(run_dir: Path) -> list[str]:
    """Step directories without a commit marker (leftovers of a crashed or aborted save)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if not (p / MARKER).exists())


def step_dirs(run_dir: Path) -> list[str]:
    """Every entry under ``checkpoints/``."""
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------------------------------------
# The save-loop child that kills itself at a chosen storage event.
# ---------------------------------------------------------------------------------------------
CRASH_KEEP_LAST_N = 3


def crash_store_options() -> dict[str, Any]:
    """The options the crash child saves with (the parent reads the run with the same)."""
    return {"metric_name": "loss", "mode": "min", "keep_last_n": CRASH_KEEP_LAST_N, "max_shard_size": SHARD_LIMIT}


class _KillSwitch:
    """Counts storage events; at event number ``kill_at`` the process SIGKILLs itself."""

    def __init__(self, kill_at: int, trace_path: str | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.trace = open(trace_path, "a") if trace_path else None  # noqa: SIM115 - lives as long as the child

    def tick(self, kind: str, path: str) -> bool:
        """Record one event; True when the process must die at it."""
        self.count += 1
        if self.trace is not None:
            self.trace.write(f"{self.count}\t{kind}\t{path}\n")
            self.trace.flush()
        return self.count == self.kill_at

    def note(self, line: str) -> None:
        if self.trace is not None:
            self.trace.write(f"#\t{line}\n")
            self.trace.flush()

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # pragma: no cover - never reached


class _KillingFile:
    """A write-only file wrapper: at the fatal write it writes half the chunk, flushes, then dies."""

    def __init__(self, f: Any, path: str, switch: _KillSwitch) -> None:
        self._f = f
        self._path = path
        self._switch = switch

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._switch.tick("write", self._path):
            self._f.write(view[: len(view) // 2])
            self._f.flush()  # the half-written chunk reaches the file: a torn write
            self._switch.die()
        return self._f.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def install_kill_switch(kill_at: int, trace_path: str | None) -> _KillSwitch:
    """Hook every storage write chunk, fsync, rename (before and after) and delete of this process."""
    switch = _KillSwitch(kill_at, trace_path)
    original_stream = Storage.write_stream
    original_rm = Storage.rm
    original_fsync = os.fsync
    original_replace = os.replace

    def write_stream(self: Storage, path: str, writer: Any, **options: Any) -> Any:
        return original_stream(self, path, lambda f: writer(_KillingFile(f, path, switch)), **options)

    def rm(self: Storage, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        if switch.tick("rm", path):
            switch.die()
        original_rm(self, path, recursive=recursive, missing_ok=missing_ok)

    def fsync(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = f"fd:{fd}"
        if switch.tick("fsync", target):
            switch.die()
        original_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if switch.tick("rename-before", str(dst)):
            switch.die()
        original_replace(src, dst, **kwargs)
        if switch.tick("rename-after", str(dst)):
            switch.die()

    Storage.write_stream = write_stream  # type: ignore[method-assign]
    Storage.rm = rm  # type: ignore[method-assign]
    os.fsync = fsync
    os.replace = replace
    switch.original_fsync = original_fsync  # type: ignore[attr-defined]
    return switch


def crash_child(
    root: str, run_name: str, steps: list[int], kill_at: int, trace_path: str | None, log_path: str
) -> None:
    """Save ``steps`` in a loop (retention on); die at storage event ``kill_at`` (0: never).

    After each save returns, the step is appended to ``log_path`` (fsync'd): the parent then
    knows which steps were certainly committed before the kill.
    """
    from ray_ckpt import CheckpointStore

    store = CheckpointStore(root, run_name=run_name, **crash_store_options())
    store.gc()
    switch = install_kill_switch(kill_at, trace_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for step in steps:
        switch.note(f"save {step}")
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step}, trainer_state=trainer_state_for(step))
        os.write(fd, f"{step}\n".encode())
        switch.original_fsync(fd)  # type: ignore[attr-defined]
        switch.note(f"committed {step}")
    os.close(fd)


def fork_server() -> None:
    """Serve save-loop children: read one JSON argument list per stdin line, fork, reply the status.

    Runs in a subprocess that imported torch and ray_ckpt once (no compute, no threads yet), so
    each child starts in milliseconds instead of paying the imports again.
    """
    import shutil
    import sys
    import tempfile
    import traceback

    from ray_ckpt import CheckpointStore

    torch.set_num_threads(1)  # no intra-op thread pool to be caught mid-fork
    scratch = tempfile.mkdtemp(prefix="ray-ckpt-warmup-")
    try:  # one save/load here pulls in every lazily imported module (pyarrow.parquet, ...) once
        warm = CheckpointStore(scratch, run_name="warmup", **crash_store_options())
        warm.save(1, tensors_for(1), metrics={"loss": 1.0}, trainer_state=trainer_state_for(1))
        warm.verify(1)
        warm.load_trainer_state(1)
        warm.gc()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the loop, never return into the server's loop
            code = 0
            try:
                crash_child(*args)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(f"{code}\n")
        sys.stdout.flush()


class ForkServer:
    """The parent's end of :func:`fork_server`: ``run(args) -> exit code`` (-9 when SIGKILLed)."""

    def __init__(self) -> None:
        import subprocess
        import sys

        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.reliability.faults import fork_server; fork_server()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=repo,
        )

    def run(self, *args: Any) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"fork server died (exit {self.proc.poll()})")
        return int(reply)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@dataclass
class TraceEvent:
    """One storage event of a traced (not killed) save loop."""

    number: int
    kind: str
    path: str
    step: int  # the step being saved when it happened


def read_trace(path: Path) -> list[TraceEvent]:
    """The events of a trace file, each tagged with the step whose save produced it."""
    events: list[TraceEvent] = []
    step = -1
    for line in path.read_text().splitlines():
        first, rest = line.split("\t", 1)
        if first == "#":
            if rest.startswith("save "):
                step = int(rest.split()[1])
            continue
        kind, target = rest.split("\t", 1)
        events.append(TraceEvent(int(first), kind, target, step))
    return events


# ---------------------------------------------------------------------------------------------
# Loopback S3: a moto server that can be stopped and started on the same port (state kept).
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_options(url: str) -> dict[str, Any]:
    """s3fs options for a loopback endpoint, with botocore's own retries off (ours are under test)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10},
    }


class MotoServer:
    """moto's S3 server on a fixed loopback port; ``stop()`` refuses connections, ``start()`` resumes."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None
        self.running = False
        self.start()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.server.stop()
        self.server._server.server_close()  # stop() leaves the socket listening: close it (refused, not hung)

    def make_bucket(self) -> str:
        import uuid

        import boto3

        bucket = f"rel-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (straight from the server, no cache)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)


# ---------------------------------------------------------------------------------------------
# A loopback HTTP proxy that injects S3 errors.
# ---------------------------------------------------------------------------------------------
Fault = tuple[int, str]  # (HTTP status, S3 error code)
Policy = Callable[[str, str, int], Fault | None]  # (method, path, nth request of that method) -> fault


@dataclass
class ProxyRecord:
    """One request the proxy saw and what it answered."""

    at: float
    method: str
    path: str
    status: int
    injected: bool


@dataclass
class FaultProxy:
    """Forwards HTTP requests to ``upstream``; ``policy`` decides which get an injected S3 error."""

    upstream: str
    policy: Policy | None = None
    records: list[ProxyRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        host, port = self.upstream.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self._counts[method] = self._counts.get(method, 0) + 1
            nth = self._counts[method]
        return self.policy(method, path, nth) if self.policy is not None else None

    def record(self, method: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.records.append(ProxyRecord(time.monotonic(), method, path, status, injected))

    def requests(self, method: str | None = None, contains: str = "") -> list[ProxyRecord]:
        with self._lock:
            return [r for r in self.records if (method is None or r.method == method) and contains in r.path]

    def reset(self, policy: Policy | None = None) -> None:
        with self._lock:
            self.records.clear()
            self._counts.clear()
            self.policy = policy

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    """Reads a request whole, then injects a fault or relays it to the upstream server."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("proxy: " + format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        fault = proxy.decide(self.command, self.path)
        if fault is not None:
            status, code = fault
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message><RequestId>fault</RequestId></Error>"
            ).encode()
            # recorded before the client can have its answer: a count read after a call returns
            # includes every request of that call, however late this thread runs
            proxy.record(self.command, self.path, status, True)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        skip = {"connection", "transfer-encoding", "expect", "content-length", "keep-alive"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*proxy._target, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            proxy.record(self.command, self.path, response.status, False)  # before the client has its answer
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                lower = key.lower()
                if lower in ("transfer-encoding", "connection", "keep-alive"):
                    continue
                if lower == "content-length" and self.command != "HEAD":
                    continue
                self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def hold_writes(storage: Any, needle: str, gate_dir: str) -> None:
    """Inside an actor: the write of a path containing ``needle`` completes, then blocks forever.

    Touches ``<gate_dir>/reached`` when it holds, so a test can ``ray.kill`` the actor mid-save.
    """
    original = storage.write_stream

    def write_stream(path: str, writer: Any, **kwargs: Any) -> Any:
        result = original(path, writer, **kwargs)
        if needle in path:
            Path(gate_dir, "reached").write_text(path)
            while True:  # the writing thread is stuck here until the process is killed
                time.sleep(0.05)
        return result

    storage.write_stream = write_stream


def actor_pid(handle: Any) -> int:
    """The pid of the checkpointer actor's current process."""
    import ray

    return ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()))


def restarted_pid(handle: Any, pid_before: int, timeout: float = 120.0) -> int:
    """The pid of the actor's next incarnation (ray.kill is asynchronous; calls fail meanwhile)."""
    import ray

    deadline, pid = time.monotonic() + timeout, pid_before
    while pid == pid_before and time.monotonic() < deadline:
        try:
            pid = ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    return pid
