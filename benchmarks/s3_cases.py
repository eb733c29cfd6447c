"""S3 cases on a loopback endpoint: moto's server app (as ``ThreadedMotoServer`` runs it) on 127.0.0.1,
in a subprocess of its own (so the server and the client do not share one GIL), counting what it
serves (:func:`served`). ray-ckpt saves/loads a checkpoint through
its s3fs-backed Storage; the baseline is s3fs ``put``/``get`` of the very same files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.measure import CaseResult, same_tensors, state_nbytes, throughput_case, timed
from ray_ckpt import CheckpointStore
from ray_ckpt.core.layout import step_dir

logger = logging.getLogger(__name__)

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STATS_PATH = "/__bench_served__"  # the endpoint's own path: what it has served so far, as JSON
_SERVER = (
    "import json, sys, threading\n"
    "from werkzeug.serving import make_server\n"
    "from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app\n"
    "inner = DomainDispatcherApplication(create_backend_app)\n"
    "served, lock = {}, threading.Lock()\n"
    "def app(environ, start_response):\n"  # moto's app, counting requests and response body bytes per method
    f"    if environ['PATH_INFO'] == {STATS_PATH!r}:\n"
    "        with lock:\n"
    "            body = json.dumps(served).encode()\n"
    "        start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])\n"
    "        return [body]\n"
    "    method = environ['REQUEST_METHOD']\n"
    "    out = inner(environ, start_response)\n"
    "    chunks = list(out)\n"
    "    if hasattr(out, 'close'):\n"
    "        out.close()\n"
    "    size = sum(len(c) for c in chunks)\n"
    "    kinds = [method] + ([method + ' *.safetensors'] if environ['PATH_INFO'].endswith('.safetensors') else [])\n"
    "    with lock:\n"
    "        for kind in kinds:\n"
    "            count = served.setdefault(kind, {'requests': 0, 'bytes': 0})\n"
    "            count['requests'] += 1\n"
    "            count['bytes'] += size\n"
    "    return chunks\n"
    "server = make_server('127.0.0.1', int(sys.argv[1]), app, True, request_handler=MotoRequestHandler)\n"
    "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
    "sys.stdin.read()\n"  # runs until the benchmark closes our stdin
    "server.shutdown()\n"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_endpoint(nice: int = 0) -> Iterator[dict[str, Any]]:
    """A loopback S3 endpoint in a subprocess (run at ``nice``); yields s3fs storage options for it.

    A real endpoint is another machine: at a high ``nice`` the server's CPU (MD5 of every part,
    in Python) yields to the processes under test on this one.
    """
    os.environ.update({k: os.environ.get(k, v) for k, v in _AWS_ENV.items()})
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    port = _free_port()
    proc = subprocess.Popen(
        ["nice", "-n", str(nice), sys.executable, "-c", _SERVER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # one access-log line per request
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        yield {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        }
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served(options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What the endpoint of ``options`` has served so far: ``{kind: {"requests": n, "bytes": body bytes}}``.

    A kind is a method (``"GET"``), or a method and ``*.safetensors`` for the requests of tensor files.

    Counted inside the server (response bodies), so every client's reads count, in any process.
    """
    import urllib.request

    url = options["client_kwargs"]["endpoint_url"] + STATS_PATH
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our loopback endpoint
        return json.loads(response.read())


def make_bucket(options: dict[str, Any]) -> str:
    """A fresh bucket on the endpoint of ``options`` (boto3: s3fs.mkdir sends a LocationConstraint
    that us-east-1 refuses)."""
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=options["client_kwargs"]["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    return bucket


def run_s3_cases(state: dict[str, torch.Tensor], workdir: str, repeat: int) -> list[CaseResult]:
    """ray-ckpt save/load on the loopback endpoint vs s3fs put/get of the same checkpoint files."""
    import s3fs

    nbytes = state_nbytes(state)
    local = CheckpointStore(os.path.join(workdir, "s3_local"), run_name="bench")
    local.save(0, state)
    local_dir = local.storage.local_path(step_dir(0))
    assert local_dir is not None
    files_size = sum(os.path.getsize(os.path.join(local_dir, n)) for n in os.listdir(local_dir))
    get_dir = os.path.join(workdir, "s3_get")
    with moto_endpoint() as options:
        bucket = make_bucket(options)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
        store = CheckpointStore(f"s3://{bucket}/ray", run_name="bench", storage_options=options)
        times: dict[str, list[float]] = {"save": [], "put": [], "load": [], "get": []}
        for i in range(repeat):
            if i:
                store.delete(i - 1)
                fs.rm(f"{bucket}/s3fs/{i - 1}", recursive=True)
            times["save"].append(timed(lambda i=i: store.save(i, state)))
            times["put"].append(
                timed(lambda i=i: fs.put(local_dir.rstrip("/") + "/", f"{bucket}/s3fs/{i}/", recursive=True))
            )
            loaded: list[dict[str, torch.Tensor]] = []
            times["load"].append(timed(lambda i=i, loaded=loaded: loaded.append(store.load(i))))
            if i == 0 and not same_tensors(loaded[0], state):
                raise AssertionError("S3 load returned different tensors")
            del loaded
            shutil.rmtree(get_dir, ignore_errors=True)
            times["get"].append(
                timed(lambda i=i: fs.get(f"{bucket}/s3fs/{i}/", get_dir.rstrip("/") + "/", recursive=True))
            )
            logger.info(
                "s3 round %d: %s (load %.2f)", i, {k: round(v[-1], 3) for k, v in times.items()}, os.getloadavg()[0]
            )
        fs.rm(bucket, recursive=True)
    shutil.rmtree(get_dir, ignore_errors=True)
    return [
        throughput_case("s3_store_save", "s3", "CheckpointStore.save to s3:// (loopback moto)", nbytes, times["save"]),
        throughput_case(
            "s3fs_put",
            "s3",
            "s3fs put of the same checkpoint files from local disk",
            nbytes,
            times["put"],
            files_size=files_size,
        ),
        throughput_case(
            "s3_store_load", "s3", "CheckpointStore.load from s3:// (checksums verified)", nbytes, times["load"]
        ),
        throughput_case("s3fs_get", "s3", "s3fs get of the same files to local disk", nbytes, times["get"]),
    ]
