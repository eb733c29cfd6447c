"""The ``ray-ckpt`` command line (also ``python -m ray_ckpt``).

Commands: ``ls`` (a run's checkpoints, or the runs under a storage root), ``best``, ``inspect``,
``verify``, ``gc``, ``retention``, ``migrate`` (legacy files and model folders into runs),
``import`` (one model folder, file or downloaded step as a step of a run), ``cp`` (a step into
another run, on any storage), ``export`` (a step as a standalone Hugging Face folder),
``download`` (a step's files, checksum-verified), ``plot`` and ``completion`` (bash/zsh).

Tables (rich) and byte progress bars on a terminal, plain text on pipes, ``--json`` for scripts
(errors too: ``{"error": ..., "type": ...}``). Errors exit non-zero with a one-line message
(``--debug`` shows the traceback); a closed pipe (``ray-ckpt ls | head``) ends quietly. See
docs/CLI.md. torch is imported only where a command touches a tensor (:mod:`ray_ckpt.cli.lazyimport`):
``--help``, ``--version`` and ``ls`` never import it. Everything goes through the library: the
store for runs, :mod:`ray_ckpt.interop.legacy` for legacy files and model folders, :mod:`ray_ckpt.interop.migrate`
for migration and import.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ray_ckpt.core.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RayCkptError,
    StorageError,
)

if TYPE_CHECKING:  # annotations only: the modules themselves are imported where a command needs them
    from rich.table import Table

    from ray_ckpt.core.store import CheckpointStore
    from ray_ckpt.core.uri import ParsedURI
    from ray_ckpt.interop.artifact import CheckpointArtifact

EXIT_OK = 0
EXIT_ERROR = 1  # corruption, a missing run or checkpoint, a failed migration
EXIT_USAGE = 2  # bad arguments or a malformed URI
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE), as coreutils exit
STORAGE_OPTIONS_ENV = "RAY_CKPT_STORAGE_OPTIONS"

SELECTOR_GRAMMAR = ":latest (the default), :best (by the run's metric, or --metric), :vN or :step_N (step N)"
RUN_URI_HELP = (
    "a run: <storage>/<run_name>, where <storage> is a path, file:// or s3://bucket/prefix (any fsspec URI), "
    f"optionally followed by a selector: {SELECTOR_GRAMMAR}; e.g. s3://bucket/runs/exp:best. "
    "A step directory <run>/checkpoints/step_NNNNNNNNN works too"
)
RUN_URI_NO_SELECTOR_HELP = (
    "a run: <storage>/<run_name>, where <storage> is a path, file:// or s3://bucket/prefix (any fsspec URI); "
    "no selector (the command reads the whole run)"
)
CKPT_URI_HELP = (
    f"a checkpoint: a run URI with a selector ({SELECTOR_GRAMMAR}), a step directory, a legacy file "
    "(.pt/.pth/.bin/.ckpt/.safetensors), a Hugging Face model folder or its model.safetensors.index.json, "
    "or mock://NAME"
)

logger = logging.getLogger("ray_ckpt.cli.main")


class CommandError(Exception):
    """A failure the CLI reports as one line with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Output helpers.
# ---------------------------------------------------------------------------------------------
def human_size(n: int | float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as the config's size parser uses; rich's formatter)."""
    from rich.filesize import decimal

    return decimal(int(n))


def _fmt_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def _fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _stdout_is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table: ruled and styled on a terminal, plain aligned columns on a pipe."""
    from rich import box
    from rich.table import Table

    terminal = _stdout_is_terminal()
    table = Table(
        box=box.SIMPLE_HEAD if terminal else None,
        show_edge=False,
        pad_edge=False,
        highlight=False,
        header_style="bold" if terminal else "",
    )
    for header in headers:
        table.add_column(str(header), overflow="fold" if terminal else "ignore", no_wrap=not terminal)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    return table


def plain_text(renderable: Any) -> str:
    """A renderable (a table, a string) as plain text: no colour, no wrapping, no trailing blanks."""
    from rich.console import Console

    if isinstance(renderable, str):
        return renderable
    console = Console(file=io.StringIO(), width=1 << 16, no_color=True, highlight=False, emoji=False)
    with console.capture() as captured:
        console.print(renderable)
    return "\n".join(line.rstrip() for line in captured.get().rstrip("\n").splitlines())


def _show(parts: Any) -> None:
    """Print text and tables on stdout: through rich on a terminal, as plain text on a pipe."""
    from rich.console import Console

    items = list(parts) if isinstance(parts, (list, tuple)) else [parts]
    if _stdout_is_terminal():
        console = Console(file=sys.stdout, highlight=False)
        for item in items:
            console.print(item, markup=False) if isinstance(item, str) else console.print(item)
    else:
        print("\n".join(plain_text(item) for item in items), flush=True)


@contextlib.contextmanager
def byte_progress(label: str, total: int, *, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (bytes, rate, ETA), shown only when stderr is a terminal.

    Yields ``advance(nbytes, what="")``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    shown = enabled and bool(getattr(sys.stderr, "isatty", lambda: False)())
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=not shown,
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=max(total, 0))

        def advance(nbytes: int, what: str = "") -> None:
            progress.update(task, advance=nbytes, description=f"{label} {what}".rstrip())

        yield advance


def _emit(args: argparse.Namespace, payload: Any, human: Callable[[], str | Sequence[Any]]) -> None:
    """``payload`` as JSON under ``--json``, else what ``human()`` returns (text and tables)."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str), flush=True)
    else:
        _show(human())


# ---------------------------------------------------------------------------------------------
# Argument helpers.
# ---------------------------------------------------------------------------------------------
def parse_storage_options(pairs: Sequence[str] | None, env: str | None = None) -> dict[str, Any]:
    """Storage options from ``$RAY_CKPT_STORAGE_OPTIONS`` (a JSON object) then ``KEY=VALUE`` pairs.

    Values are parsed as JSON when they can be (``true``, ``3``, ``{...}``), else kept as strings;
    dotted keys nest (``client_kwargs.region_name=us-east-1``).
    """
    options: dict[str, Any] = {}
    if env:
        try:
            loaded = json.loads(env)
        except ValueError as exc:
            raise CommandError(f"${STORAGE_OPTIONS_ENV}: not a JSON object: {exc}", EXIT_USAGE) from exc
        if not isinstance(loaded, dict):
            raise CommandError(f"${STORAGE_OPTIONS_ENV}: expected a JSON object", EXIT_USAGE)
        options.update(loaded)
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--storage-option {pair!r}: expected KEY=VALUE", EXIT_USAGE)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise CommandError(f"--storage-option {pair!r}: {part!r} is not a mapping", EXIT_USAGE)
        target[leaf] = value
    return options


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return parse_storage_options(getattr(args, "storage_option", None), os.environ.get(STORAGE_OPTIONS_ENV))


def _open(args: argparse.Namespace, uri: str | None = None) -> tuple[CheckpointStore, ParsedURI]:
    """The run a command names, through :func:`~ray_ckpt.interop.artifact.open_run` (ConfigError, exit 2,
    for a URI that names no run), with the ranking/retention options given on the command line."""
    from ray_ckpt.core.uri import parse_uri
    from ray_ckpt.interop.artifact import open_run

    parsed = parse_uri(uri or args.run_uri)
    store = open_run(
        parsed,
        _storage_options(args),
        metric_name=getattr(args, "metric", None),
        mode=getattr(args, "mode", None),
        keep_top_k=getattr(args, "keep_top_k", None),
        keep_last_n=getattr(args, "keep_last_n", None),
        keep_period=getattr(args, "keep_period", None),
        keep_checkpoints_without_metrics=getattr(args, "keep_checkpoints_without_metrics", None),
    )
    return store, parsed


def _whole_run(args: argparse.Namespace) -> None:
    """Refuse a selector or a step directory where a command reads the whole run (``ls``, ``best``,
    ``gc``, ``retention``, ``plot``): it would be ignored otherwise."""
    from ray_ckpt.core.uri import parse_uri

    parsed = parse_uri(args.run_uri)
    if parsed.selector is not None or parsed.kind == "step":
        what = f"the selector :{parsed.selector}" if parsed.selector is not None else "a step directory"
        raise CommandError(
            f"{args.run_uri}: {args.command} reads a whole run, and {what} names one checkpoint; give the run "
            f"({parsed.run_uri}) (inspect, verify, cp, export and download take one checkpoint)",
            EXIT_USAGE,
        )


def _marks(store: CheckpointStore) -> tuple[set[int], set[int], int | None]:
    """(steps retention keeps, leased steps, best step) of a run as configured."""
    leased = store.leased_steps()
    keep, _ = store.retention_plan(leased)
    best = store.best()  # None when the run ranks nothing
    return set(keep), leased, best.step if best is not None else None


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------
def _is_run(storage: Any) -> bool:
    """Whether a directory holds a ray-ckpt run (its checkpoints or its index)."""
    from ray_ckpt.core.layout import CHECKPOINTS_DIR, INDEX_LOG_DIR, INDEX_SNAPSHOT

    return any(storage.exists(name) for name in (CHECKPOINTS_DIR, INDEX_SNAPSHOT, INDEX_LOG_DIR))


def _runs_under(args: argparse.Namespace, parsed: ParsedURI) -> list[CheckpointStore] | None:
    """The runs directly under a directory that is not a run itself (a storage root); None when it is a run."""
    from ray_ckpt.core.storage.storage import Storage
    from ray_ckpt.core.uri import validate_run_name
    from ray_ckpt.interop.artifact import open_run

    if parsed.kind != "run" or parsed.selector is not None:
        return None
    options = _storage_options(args)
    root = Storage(parsed.location, options)
    if _is_run(root):
        return None
    runs = []
    for name in root.list_names(""):
        try:
            validate_run_name(name)
        except ConfigError:
            continue
        if _is_run(Storage(root.url(name), options)):
            runs.append(open_run(root.url(name), options, metric_name=getattr(args, "metric", None)))
    return runs if runs else None


def _ls_runs(args: argparse.Namespace, location: str, runs: list[CheckpointStore]) -> int:
    """``ls`` of a storage root: one row per run."""
    rows = []
    for store in runs:
        records = store.list()
        best = store.best() if store.config.metric_name else None
        rows.append(
            {
                "run": store.run_name,
                "uri": store.uri,
                "checkpoints": len(records),
                "latest_step": records[-1].step if records else None,
                "best_step": best.step if best is not None else None,
                "metric_name": store.config.metric_name,
                "files_size": sum(r.files_size for r in records),
                "updated": max((r.created for r in records), default=0.0),
            }
        )

    def human() -> list[Any]:
        table = render_table(
            ["run", "checkpoints", "latest", "best", "size", "updated"],
            [
                (
                    r["run"],
                    r["checkpoints"],
                    "-" if r["latest_step"] is None else r["latest_step"],
                    "-" if r["best_step"] is None else f"{r['best_step']} ({r['metric_name']})",
                    human_size(r["files_size"]),
                    _fmt_time(r["updated"]),
                )
                for r in rows
            ],
        )
        return [f"storage {location}: {len(rows)} run(s)", table]

    _emit(args, {"storage": location, "runs": rows}, human)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from ray_ckpt.core.uri import parse_uri

    _whole_run(args)
    parsed = parse_uri(args.run_uri)
    runs = _runs_under(args, parsed)
    if runs is not None:
        return _ls_runs(args, parsed.location, runs)
    store, _ = _open(args)
    records = store.list()
    keep, leased, best = _marks(store)
    cfg = store.config
    rows = []
    for r in records:
        marks = ["kept" if r.step in keep else "would-delete"]
        if r.step == best:
            marks.append("best")
        if r.step in leased:
            marks.append("leased")
        rows.append((r, marks))
    payload = {
        "run": store.uri,
        "metric_name": cfg.metric_name,
        "mode": cfg.mode,
        "retention": {k: v for k, v in store.policy().items() if k not in ("metric_name", "mode")},
        "checkpoints": [
            {
                "step": r.step,
                "uri": r.uri,
                "created": r.created,
                "total_size": r.total_size,
                "files_size": r.files_size,
                "metrics": r.metrics,
                "kept": r.step in keep,
                "best": r.step == best,
                "leased": r.step in leased,
            }
            for r, _ in rows
        ],
    }

    def human() -> str:
        ranking = f"{cfg.metric_name} ({cfg.mode})" if cfg.metric_name else "none"
        head = f"run {store.uri}: {len(records)} checkpoint(s); ranked by {ranking}"
        if not records:
            return head
        table = render_table(
            ["step", "created", "size", "marks", "metrics"],
            [
                (
                    r.step,
                    _fmt_time(r.created),
                    human_size(r.files_size),
                    ",".join(marks),
                    " ".join(f"{k}={_fmt_number(v)}" for k, v in sorted(r.metrics.items())),
                )
                for r, marks in rows
            ],
        )
        return [head, table]

    _emit(args, payload, human)
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    _whole_run(args)
    store, _ = _open(args)
    cfg = store.config
    if cfg.metric_name is None:
        raise CommandError(f"{store.uri}: the run records no ranking metric; pass --metric NAME", EXIT_USAGE)
    if args.k < 1:
        raise CommandError(f"-k: must be at least 1, got {args.k}", EXIT_USAGE)
    top = store.top_k(args.k)
    if not top:
        raise CommandError(f"{store.uri}: no checkpoint has a finite {cfg.metric_name!r}")
    rows = [
        {"rank": i + 1, "step": r.step, "value": r.metrics[cfg.metric_name], "uri": r.uri, "metrics": r.metrics}
        for i, r in enumerate(top)
    ]
    payload = {"run": store.uri, "metric_name": cfg.metric_name, "mode": cfg.mode, "checkpoints": rows}

    def human() -> str:
        return render_table(
            ["rank", "step", f"{cfg.metric_name} ({cfg.mode})", "uri"],
            [(p["rank"], p["step"], _fmt_number(p["value"]), p["uri"]) for p in rows],
        )

    _emit(args, payload, human)
    return EXIT_OK


def _tensor_rows_from_header(entries: dict[str, dict[str, Any]], file_name: str) -> list[dict[str, Any]]:
    out = []
    for key, entry in entries.items():
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        out.append({"key": key, "dtype": entry["dtype"], "shape": shape, "nbytes": end - begin, "file": file_name})
    return out


def _inspect_run(args: argparse.Namespace, parsed: ParsedURI) -> dict[str, Any]:
    from ray_ckpt.core.layout import TRAINER_TENSORS

    store, _ = _open(args, parsed.location if parsed.kind == "step" else args.ckpt_uri)
    step = store.resolve(parsed.selector)
    manifest = store.read_manifest(step)
    info = store.info(step)
    tensors: list[dict[str, Any]] = []
    index_name = manifest.model.get("index")
    fmt = manifest.model.get("format", "safetensors")
    if index_name and fmt == "safetensors":
        for file_name, header in store.tensor_headers(step).items():  # only files the marker lists
            tensors += _tensor_rows_from_header(header.entries, file_name)
    elif manifest.kind == "state_dict":
        tensors = _tensor_rows(store.load(step), "")
    for alias, target in sorted((manifest.model.get("aliases") or {}).items()):
        tensors.append({"key": alias, "dtype": "", "shape": [], "nbytes": 0, "file": f"(tied to {target})"})
    trainer: dict[str, Any] | None = None
    if manifest.trainer_state and TRAINER_TENSORS in manifest.files:
        header = store.file_header(step, TRAINER_TENSORS)
        trainer = {
            "tensors": len(header.entries),
            "nbytes": sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.entries.values()),
        }
    try:
        arch = store.read_architecture()
        architecture: dict[str, Any] | None = {
            "class_path": arch.class_path,
            "config": arch.config,
            "config_class": arch.config_class,
        }
    except FileNotFoundError:
        architecture = None
    return {
        "uri": info.uri,
        "run_name": store.run_name,
        "step": step,
        "format": f"ray-ckpt ({fmt})",
        "created": info.created,
        "world_size": info.world_size,
        "metrics": info.metrics,
        "metadata": info.metadata,
        "architecture": architecture,
        "files": {name: d.size for name, d in sorted(manifest.files.items())},
        "tensors": tensors,
        "total_size": info.total_size,
        "trainer_state": trainer,
    }


def _tensor_rows(state: Any, prefix: str) -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    if isinstance(state, torch.Tensor):
        return [
            {
                "key": prefix,
                "dtype": str(state.dtype).removeprefix("torch."),
                "shape": list(state.shape),
                "nbytes": state.numel() * state.element_size(),
                "file": "",
            }
        ]
    if isinstance(state, dict):
        for k, v in state.items():
            rows += _tensor_rows(v, f"{prefix}.{k}" if prefix else str(k))
    return rows


def _inspect_file(args: argparse.Namespace, parsed: ParsedURI) -> dict[str, Any]:
    from ray_ckpt.core.format.header import read_safetensors_header
    from ray_ckpt.core.safejson import parse_json
    from ray_ckpt.core.storage.storage import Storage
    from ray_ckpt.interop.artifact import load_from_uri
    from ray_ckpt.interop.legacy import detect_format, numeric_leaves

    options = _storage_options(args)
    fmt = detect_format(parsed.location, storage_options=options)
    if fmt == "safetensors":
        storage = Storage(parsed.storage_uri, options)
        name = parsed.location.rsplit("/", 1)[1]
        with storage.open_read(name) as f:
            header = read_safetensors_header(f, name=parsed.location, file_size=storage.size(name))
        tensors = _tensor_rows_from_header(header.entries, name)
        artifact: CheckpointArtifact | None = None
        metrics: dict[str, float] = {}
        metrics_name = name.rsplit(".", 1)[0] + ".metrics.json"
        if storage.exists(metrics_name):
            metrics = numeric_leaves(parse_json(storage.read_bytes(metrics_name), name=metrics_name))
        metadata: dict[str, Any] = {"safetensors_metadata": header.metadata}
        step, run_name = None, parsed.run_name
    else:
        artifact = load_from_uri(parsed.location, storage_options=options, trust_pickle=args.trust_pickle)
        tensors = _tensor_rows(artifact.state_dict, "")
        metrics, metadata = artifact.metrics, artifact.metadata
        step, run_name = artifact.step, artifact.run_name
    arch = artifact.architecture if artifact is not None else None
    return {
        "uri": parsed.location,
        "run_name": run_name,
        "step": step,
        "format": f"legacy ({fmt})",
        "metrics": metrics,
        "metadata": metadata,
        "architecture": {"class_path": arch.class_path, "config": arch.config} if arch else None,
        "tensors": tensors,
        "total_size": sum(t["nbytes"] for t in tensors),
        "trainer_state": None,
    }


def _hf_folder_of(args: argparse.Namespace, parsed: ParsedURI) -> str | None:
    """The location of the Hugging Face model folder (or index) a URI names, if it names one."""
    from ray_ckpt.core.storage.storage import Storage
    from ray_ckpt.core.uri import is_hf_index_name
    from ray_ckpt.interop.legacy import find_hf_folder

    if parsed.kind == "file" and is_hf_index_name(parsed.location):
        return parsed.location
    if parsed.kind != "run" or _is_run(Storage(parsed.location, _storage_options(args))):
        return None
    found = find_hf_folder(parsed.location, storage_options=_storage_options(args))
    return found.location if found is not None else None


def _inspect_hf(args: argparse.Namespace, location: str) -> dict[str, Any]:
    from ray_ckpt.interop.artifact import load_from_uri

    artifact = load_from_uri(location, storage_options=_storage_options(args))
    arch = artifact.architecture
    tensors = _tensor_rows(artifact.state_dict, "")
    return {
        "uri": location,
        "run_name": artifact.run_name,
        "step": artifact.step,
        "format": "Hugging Face folder",
        "metrics": artifact.metrics,
        "metadata": artifact.metadata,
        "architecture": {"class_path": arch.class_path, "config": arch.config, "config_class": arch.config_class}
        if arch
        else None,
        "tensors": tensors,
        "total_size": sum(t["nbytes"] for t in tensors),
        "trainer_state": None,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from ray_ckpt.core.uri import parse_uri
    from ray_ckpt.interop.artifact import load_from_uri

    parsed = parse_uri(args.ckpt_uri)
    hf = _hf_folder_of(args, parsed)
    if hf is not None:
        payload = _inspect_hf(args, hf)
    elif parsed.kind == "file":
        payload = _inspect_file(args, parsed)
    elif parsed.kind == "mock":
        artifact = load_from_uri(args.ckpt_uri)
        arch = artifact.architecture
        payload = {
            "uri": artifact.uri,
            "run_name": artifact.run_name,
            "step": artifact.step,
            "format": "mock",
            "metrics": {},
            "metadata": {},
            "architecture": {"class_path": arch.class_path, "config": arch.config} if arch else None,
            "tensors": _tensor_rows(artifact.state_dict, ""),
            "trainer_state": None,
        }
        payload["total_size"] = sum(t["nbytes"] for t in payload["tensors"])
    else:
        payload = _inspect_run(args, parsed)

    def human() -> str:
        lines = [
            f"checkpoint   {payload['uri']}",
            f"run / step   {payload['run_name']} / {payload['step']}",
            f"format       {payload['format']}",
            f"tensors      {len(payload['tensors'])} ({human_size(payload['total_size'])})",
        ]
        if payload.get("created"):
            lines.append(f"created      {_fmt_time(payload['created'])}")
        arch = payload.get("architecture")
        config = json.dumps(arch["config"], sort_keys=True) if arch else ""
        lines.append(f"architecture {arch['class_path']} {config}" if arch else "architecture -")
        metrics = payload.get("metrics") or {}
        lines.append("metrics      " + (" ".join(f"{k}={_fmt_number(v)}" for k, v in sorted(metrics.items())) or "-"))
        if payload.get("trainer_state"):
            ts = payload["trainer_state"]
            lines.append(f"trainer      {ts['tensors']} tensors ({human_size(ts['nbytes'])})")
        if payload.get("files"):
            lines.append("files        " + ", ".join(f"{n} ({human_size(s)})" for n, s in payload["files"].items()))
        table = render_table(
            ["key", "dtype", "shape", "size", "file"],
            [
                (t["key"], t["dtype"], "x".join(map(str, t["shape"])) or "()", human_size(t["nbytes"]), t["file"])
                for t in payload["tensors"]
            ],
        )
        return ["\n".join(lines) + "\n", table]

    _emit(args, payload, human)
    return EXIT_OK


def _marked_steps(store: CheckpointStore) -> list[int]:
    """Every step directory with a commit marker, including ones whose marker is unreadable."""
    from ray_ckpt.core.layout import CHECKPOINTS_DIR, MARKER_FILE, parse_step_dir, step_dir

    steps = []
    for name in store.storage.list_names(CHECKPOINTS_DIR):
        step = parse_step_dir(name)
        if step is not None and store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            steps.append(step)
    return sorted(steps)


def _verifiable(args: argparse.Namespace, parsed: ParsedURI) -> None:
    """Refuse a directory that is no run (a storage root, an empty folder, a folder of sources):
    verifying nothing must not report success."""
    from ray_ckpt.core.storage.storage import Storage

    if parsed.kind != "run" or parsed.selector is not None:
        return
    options = _storage_options(args)
    storage = Storage(parsed.location, options)
    if _is_run(storage):
        return
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"{parsed.location}: no such run, step or checkpoint")
    runs = _runs_under(args, parsed) or []
    hint = (
        f"a storage root holding {len(runs)} run(s) ({', '.join(r.run_name for r in runs[:3])}"
        f"{', ...' if len(runs) > 3 else ''}): verify each run"
        if runs
        else "no checkpoints/, index or model files in it"
    )
    raise CommandError(f"{parsed.location}: not a run, a step or a checkpoint ({hint})")


def cmd_verify(args: argparse.Namespace) -> int:
    from ray_ckpt.core.uri import parse_uri
    from ray_ckpt.interop.artifact import load_from_uri

    parsed = parse_uri(args.uri)
    results: list[dict[str, Any]] = []
    hf = _hf_folder_of(args, parsed)
    if parsed.kind in ("file", "mock") or hf is not None:
        try:  # read whole: every header, every tensor the index lists
            artifact = load_from_uri(
                hf or args.uri, storage_options=_storage_options(args), trust_pickle=args.trust_pickle
            )
            results.append({"uri": parsed.location, "step": artifact.step, "ok": True, "error": None})
        except (CorruptCheckpointError, RayCkptError) as exc:
            results.append({"uri": parsed.location, "step": None, "ok": False, "error": _one_line(exc)})
    else:
        _verifiable(args, parsed)
        store, _ = _open(args, args.uri)
        if parsed.kind == "step" or parsed.selector is not None:
            steps = [store.resolve(parsed.selector)]
        else:
            steps = _marked_steps(store)
            try:
                store.read_architecture()
            except FileNotFoundError:
                pass
            except (CorruptCheckpointError, StorageError) as exc:
                results.append(
                    {
                        "uri": f"{store.uri}/model_architecture.json",
                        "step": None,
                        "ok": False,
                        "error": _one_line(exc),
                    }
                )
        sizes = {r.step: r.files_size for r in store.list()}
        with byte_progress("verify", sum(sizes.get(s, 0) for s in steps), enabled=not _json(args)) as advance:
            for step in steps:
                target = store.step_uri(step)
                try:
                    store.verify(step)
                    results.append({"uri": target, "step": step, "ok": True, "error": None})
                except (CorruptCheckpointError, CheckpointNotFoundError, StorageError) as exc:
                    # every step is reported: one unreadable file (a FIFO, a directory) is one bad step
                    results.append({"uri": target, "step": step, "ok": False, "error": _one_line(exc)})
                advance(sizes.get(step, 0), f"step {step}")
        if not steps and parsed.kind == "run" and parsed.selector is None:
            results.append({"uri": store.uri, "step": None, "ok": True, "error": None, "note": "no checkpoints"})
    ok = all(r["ok"] for r in results)
    payload = {"ok": ok, "results": results}

    def human() -> str:
        lines = [
            f"{'ok' if r['ok'] else 'CORRUPT':8} {r['uri']}" + (f"  {r['error']}" if r["error"] else "")
            for r in results
        ]
        bad = sum(not r["ok"] for r in results)
        lines.append(f"{len(results) - bad} ok, {bad} corrupt")
        return "\n".join(lines)

    _emit(args, payload, human)
    return EXIT_OK if ok else EXIT_ERROR


def cmd_gc(args: argparse.Namespace) -> int:
    _whole_run(args)
    store, _ = _open(args)
    removed = store.gc(dry_run=args.dry_run)
    keep, doomed = store.retention_plan(store.leased_steps())
    deleted = store.apply_retention() if args.apply_retention and not args.dry_run else []
    payload = {
        "run": store.uri,
        "dry_run": args.dry_run,
        "leftovers": removed,
        "retention_would_delete": doomed,
        "retention_keeps": keep,
        "retention_deleted": deleted,
    }

    def human() -> str:
        verb = "would remove" if args.dry_run else "removed"
        lines = [f"{verb} {len(removed)} uncommitted leftover(s)"] + [f"  {p}" for p in removed]
        if deleted:
            lines.append(f"retention deleted steps {deleted}")
        elif doomed and not args.apply_retention:
            lines.append(f"retention would delete steps {doomed} (pass --apply-retention to delete them)")
        elif doomed:
            lines.append(
                f"retention would delete steps {doomed} (not deleted: dry run)"
                if args.dry_run
                else f"retention deleted nothing: steps {doomed} were leased meanwhile"
            )
        else:
            lines.append("retention would delete nothing")
        return "\n".join(lines)

    _emit(args, payload, human)
    return EXIT_OK


def cmd_retention(args: argparse.Namespace) -> int:
    """What the run's retention rules keep, and why; ``--apply`` deletes the rest (dry run by default)."""
    _whole_run(args)
    from ray_ckpt.core.retention import LEASED, explain, policy_from_config

    store, _ = _open(args)
    records = store.list()  # the run's index, read once
    leased = store.leased_steps()
    kept, doomed = explain(store.index, policy_from_config(store.config, leased, protected_reason=LEASED))
    deleted = store.apply_retention() if args.apply and doomed else []
    metric = store.config.metric_name
    gone = set(deleted)

    def action(step: int) -> tuple[str, list[str]]:
        if step in kept:
            return "keep", kept[step]
        if not args.apply:
            return "delete", []
        return ("deleted", []) if step in gone else ("keep", [LEASED])  # leased while it was applied

    rows = [
        {
            "step": info.step,
            "action": action(info.step)[0],
            "reasons": action(info.step)[1],
            "metric": info.metrics.get(metric) if metric else None,
        }
        for info in records
    ]
    payload = {
        "run": store.uri,
        "dry_run": not args.apply,
        "policy": store.policy(),
        "steps": rows,
        "would_delete": doomed,
        "deleted": deleted,
    }

    def human() -> str:
        cfg = store.config
        rules = ", ".join(f"{name}={value}" for name, value in store.policy().items() if value is not None)
        head = f"run {store.uri}: {len(rows)} checkpoint(s); retention {rules}"
        if not rows:
            return head
        table = render_table(
            ["step", "action", "kept by", metric or "metric"],
            [
                (
                    r["step"],
                    r["action"],
                    ",".join(r["reasons"]) or "-",
                    _fmt_number(r["metric"]) if r["metric"] is not None else "-",
                )
                for r in rows
            ],
        )
        if args.apply:
            tail = f"deleted {len(deleted)} step(s): {deleted}" if deleted else "deleted nothing"
            if set(doomed) - set(deleted):
                tail += f" (kept {sorted(set(doomed) - set(deleted))}: leased meanwhile)"
        elif doomed:
            tail = f"would delete {len(doomed)} step(s): {doomed} (dry run; pass --apply to delete)"
        else:
            tail = "nothing to delete" + (
                ""
                if cfg.keep_top_k is not None or cfg.keep_last_n is not None
                else " (neither keep_top_k nor keep_last_n is set)"
            )
        return [head, table, tail]

    _emit(args, payload, human)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from ray_ckpt.interop.migrate import migrate

    as_json = _json(args)
    with contextlib.ExitStack() as stack:
        advance: list[Callable[..., None]] = []

        def on_plan(plan: list[tuple[str, int]]) -> None:
            total = sum(n for _, n in plan)
            advance.append(stack.enter_context(byte_progress("migrate", total, enabled=not as_json)))

        def on_item(item: Any) -> None:
            if not as_json:
                where = f"{item.run_name} step {item.step}" if item.run_name is not None else ""
                print(f"{item.action:14} {item.source}  {where}  {item.detail}".rstrip(), flush=True)
            if advance:
                advance[0](item.nbytes, item.source.rsplit("/", 1)[-1])

        report = migrate(
            args.src,
            args.dst,
            dry_run=args.dry_run,
            replace=args.replace,
            trust_pickle=args.trust_pickle,
            storage_options=_storage_options(args),
            on_item=on_item,
            on_plan=on_plan,
            allowed_architecture_prefixes=_allowed_architectures(args),
        )
    if as_json:
        print(json.dumps({"ok": report.ok, "items": [i.to_dict() for i in report.items]}, indent=2))
    else:
        counts = ", ".join(f"{n} {action}" for action, n in sorted(report.counts().items())) or "no legacy files"
        print(f"{'dry run: ' if args.dry_run else ''}{counts}")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_import(args: argparse.Namespace) -> int:
    """One model folder (or legacy file) as a committed step of a run."""
    from ray_ckpt.interop.migrate import import_checkpoint, read_step_folder

    folder = read_step_folder(args.src, _storage_options(args))
    if folder is not None:
        return _import_step_folder(args, *folder)
    item = import_checkpoint(
        args.src,
        args.run_uri,
        step=args.step,
        dry_run=args.dry_run,
        replace=args.replace,
        trust_pickle=args.trust_pickle,
        storage_options=_storage_options(args),
        allowed_architecture_prefixes=_allowed_architectures(args),
    )
    payload = {"ok": item.ok, **item.to_dict()}

    def human() -> str:
        return f"{item.action} {item.source} -> run {item.run_name} step {item.step}  {item.detail}".rstrip()

    _emit(args, payload, human)
    return EXIT_OK if item.ok else EXIT_ERROR


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _destination(args: argparse.Namespace, dest: str) -> Any:
    """The storage of an export/download destination, refusing a non-empty one unless --overwrite."""
    from ray_ckpt.core.storage.storage import Storage
    from ray_ckpt.core.uri import normalize_storage_uri

    storage = Storage(normalize_storage_uri(dest), _storage_options(args))
    present = storage.list_names("")
    if present and not args.overwrite:
        raise CommandError(
            f"{storage.uri}: not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
            "pass --overwrite to write into it",
            EXIT_USAGE,
        )
    return storage


def _step_of(args: argparse.Namespace) -> tuple[CheckpointStore, int, Any]:
    store, parsed = _open(args, args.run_uri)
    step = store.resolve(parsed.selector)
    return store, step, store.read_manifest(step)


def _model_files(store: CheckpointStore, manifest: Any) -> list[str]:
    """The model's index and shards of a committed step (what a Hugging Face folder holds)."""
    from ray_ckpt.core.layout import step_dir
    from ray_ckpt.core.safejson import JsonObject

    index = manifest.model.get("index")
    if manifest.kind != "state_dict" or not index:
        raise CommandError(f"step {manifest.step}: holds no model index (kind {manifest.kind!r}); use download")
    if manifest.model.get("format", "safetensors") != "safetensors":
        raise CommandError(f"step {manifest.step}: model in {manifest.model.get('format')!r} format, not safetensors")
    path = f"{step_dir(manifest.step)}/{index}"
    weight_map = JsonObject.parse(store.storage.read_bytes(path), name=store.storage.url(path)).dict("weight_map")
    shards = sorted({f for f in weight_map.values() if isinstance(f, str)})
    unlisted = [f for f in shards if f not in manifest.files]
    if unlisted:
        raise CorruptCheckpointError(f"{store.storage.url(path)}: names files the marker does not list: {unlisted[:3]}")
    return [index, *shards]


def _copy_files(
    args: argparse.Namespace, label: str, store: CheckpointStore, step: int, names: list[str], dst: Any, manifest: Any
) -> dict[str, int]:
    from ray_ckpt.core.layout import step_dir
    from ray_ckpt.core.writer import copy_checked

    total = sum(manifest.files[n].size for n in names)
    with byte_progress(label, total, enabled=not _json(args)) as advance:
        for name in names:
            copy_checked(store.storage, f"{step_dir(step)}/{name}", dst, name, manifest.files[name], on_chunk=advance)
    return {name: manifest.files[name].size for name in names}


def cmd_export(args: argparse.Namespace) -> int:
    """A step as a standalone Hugging Face folder: model shards, index, config.json (and
    generation_config.json) from the run's architecture."""
    from ray_ckpt.core.architecture import hf_config_files

    store, step, manifest = _step_of(args)
    names = _model_files(store, manifest)
    dst = _destination(args, args.dest)
    files = _copy_files(args, "export", store, step, names, dst, manifest)
    try:
        arch = store.read_architecture()
    except FileNotFoundError:
        arch = None
    side = hf_config_files(arch, store.config.allowed_architecture_prefixes) if arch is not None else {}
    for name, data in side.items():
        dst.write_bytes(name, data)
        files[name] = len(data)
    note = None if side else "the run records no Hugging Face architecture: no config.json written"
    payload = {"run": store.uri, "step": step, "dest": dst.uri, "files": files, "total_size": sum(files.values())}
    if note:
        payload["note"] = note

    def human() -> str:
        text = (
            f"exported step {step} of {store.uri} to {dst.uri}: {len(files)} files ({human_size(sum(files.values()))})"
        )
        return text + (f"\nnote: {note}" if note else "")

    _emit(args, payload, human)
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    """Every file of a committed step (and its marker), checksum-verified, into a local directory,
    with the run's model_architecture.json and the step's eval scores: ``import`` of the folder
    commits the same step again."""
    from ray_ckpt.core.architecture import ARCHITECTURE_FILE
    from ray_ckpt.core.layout import EVAL_FILE, MARKER_FILE, metrics_to_json, step_dir

    store, step, manifest = _step_of(args)
    dst = _destination(args, args.dest)
    files = _copy_files(args, "download", store, step, sorted(manifest.files), dst, manifest)
    side = {MARKER_FILE: store.storage.read_bytes(f"{step_dir(step)}/{MARKER_FILE}")}
    with contextlib.suppress(FileNotFoundError):
        side[ARCHITECTURE_FILE] = store.storage.read_bytes(ARCHITECTURE_FILE)
    scores = store.run_index.read_eval_metrics(step)
    if scores:
        side[EVAL_FILE] = json.dumps(metrics_to_json(scores), allow_nan=False).encode()
    for name, data in side.items():
        dst.write_bytes(name, data)
        files[name] = len(data)
    payload = {"run": store.uri, "step": step, "dest": dst.uri, "files": files, "total_size": sum(files.values())}

    def human() -> str:
        size = human_size(sum(files.values()))
        return f"downloaded step {step} of {store.uri} to {dst.uri}: {len(files)} files ({size}), checksums ok"

    _emit(args, payload, human)
    return EXIT_OK


def _dest_run(args: argparse.Namespace, dest_uri: str, step: int) -> CheckpointStore:
    """The run a step is copied into (``cp``, ``import`` of a downloaded step): created when new;
    a step it has already is refused unless ``--replace``."""
    from ray_ckpt.core.uri import parse_uri
    from ray_ckpt.interop.artifact import open_run

    parsed = parse_uri(dest_uri)
    if parsed.kind != "run" or parsed.selector is not None:
        raise CommandError(f"{dest_uri}: expected a run URI (<storage>/<run_name>) without a selector", EXIT_USAGE)
    dst = open_run(parsed, _storage_options(args), must_exist=False)
    if step in dst and not args.replace:
        raise CommandError(f"{dst.uri}: already has step {step}; pass --replace to replace it", EXIT_USAGE)
    return dst


def _copied(info: Any, dst: CheckpointStore, manifest: Any) -> dict[str, Any]:
    return {
        "uri": info.uri,
        "run": dst.uri,
        "step": info.step,
        "metrics": info.metrics,
        "files": len(manifest.files),
        "total_size": sum(d.size for d in manifest.files.values()),
    }


def cmd_cp(args: argparse.Namespace) -> int:
    """One committed step into another run (any storage): files checksum-checked, metrics, trainer
    state, eval scores and the run's architecture with it."""
    from ray_ckpt.core.architecture import ARCHITECTURE_FILE
    from ray_ckpt.core.layout import step_dir

    store, step, manifest = _step_of(args)
    try:
        architecture: bytes | None = store.storage.read_bytes(ARCHITECTURE_FILE)
    except FileNotFoundError:
        architecture = None
    dst = _dest_run(args, args.dest, step)
    with byte_progress("cp", sum(d.size for d in manifest.files.values()), enabled=not _json(args)) as advance:
        info = dst.copy_step(
            store.storage, step_dir(step), manifest, architecture=architecture,
            eval_metrics=store.run_index.read_eval_metrics(step), overwrite=args.replace, on_chunk=advance,
        )  # fmt: skip
    payload = {**_copied(info, dst, manifest), "source": store.step_uri(step)}

    def human() -> str:
        return (
            f"copied step {step} of {store.uri} to {payload['uri']}: {payload['files']} files "
            f"({human_size(payload['total_size'])}), checksums ok"
        )

    _emit(args, payload, human)
    return EXIT_OK


def _import_step_folder(args: argparse.Namespace, storage: Any, manifest: Any) -> int:
    """``import`` of a downloaded step folder: the step as it was committed (``--step`` renumbers)."""
    from ray_ckpt.interop.migrate import import_step_folder

    step = manifest.step if args.step is None else args.step
    dst = _dest_run(args, args.run_uri, step)
    if args.dry_run:
        payload: dict[str, Any] = {"ok": True, "action": "would import", "source": storage.uri, "run": dst.uri,
                                   "step": step}  # fmt: skip
    else:
        total = sum(d.size for d in manifest.files.values())
        with byte_progress("import", total, enabled=not _json(args)) as advance:
            info = import_step_folder(storage, manifest, dst, step=step, replace=args.replace, on_chunk=advance)
        payload = {"ok": True, "action": "imported", "source": storage.uri, **_copied(info, dst, manifest)}
    _emit(args, payload, lambda: f"{payload['action']} {storage.uri} -> run {dst.uri} step {step}")
    return EXIT_OK


def _allowed_architectures(args: argparse.Namespace) -> list[str] | None:
    """``--allow-architecture`` prefixes: None (the defaults: torch.nn, transformers) when none given."""
    prefixes = getattr(args, "allow_architecture", None)
    if prefixes is None:
        return None
    if not all(p.strip(". ") for p in prefixes):
        raise ConfigError(f"--allow-architecture: expected a module prefix such as mypkg.models, got {prefixes}")
    from ray_ckpt.core.architecture import DEFAULT_ARCHITECTURE_PREFIXES

    return [*DEFAULT_ARCHITECTURE_PREFIXES, *prefixes]


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    from ray_ckpt.core.uri import parse_uri

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _whole_run(args)
    parsed = parse_uri(args.run_uri)
    store, _ = _open(argparse.Namespace(**{**vars(args), "metric": None, "mode": None}), args.run_uri)
    metric = args.metric or store.config.metric_name
    if metric is None:
        raise CommandError(f"{parsed.run_uri}: the run records no metric to plot; pass --metric NAME", EXIT_USAGE)
    mode = args.mode or (store.config.mode if store.config.metric_name == metric else "min")
    records = [r for r in store.list() if r.metric(metric) is not None]
    if not records:
        raise CommandError(f"{parsed.run_uri}: no checkpoint records a finite {metric!r}")
    keep, leased, _ = _marks(store)
    best = store.best(metric, mode)
    steps = [r.step for r in records]
    values = [r.metrics[metric] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, values, color="0.6", linewidth=1, zorder=1, label=metric)
    kept = [(r.step, r.metrics[metric]) for r in records if r.step in keep]
    dropped = [(r.step, r.metrics[metric]) for r in records if r.step not in keep]
    held = [(r.step, r.metrics[metric]) for r in records if r.step in leased]
    if kept:
        ax.scatter(*_xy(kept), color="tab:blue", s=36, zorder=2, label="kept")
    if dropped:
        ax.scatter(
            *_xy(dropped), facecolors="none", edgecolors="tab:gray", s=36, zorder=2, label="retention would delete"
        )
    if held:
        ax.scatter(*_xy(held), marker="s", facecolors="none", edgecolors="tab:green", s=90, zorder=3, label="leased")
    if best is not None:
        ax.scatter(
            [best.step],
            [best.metrics[metric]],
            marker="*",
            color="tab:red",
            s=260,
            zorder=4,
            label=f"best ({mode}): step {best.step}",
        )
        ax.annotate(
            f"{_fmt_number(best.metrics[metric])}",
            (best.step, best.metrics[metric]),
            textcoords="offset points",
            xytext=(8, 8),
            color="tab:red",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{store.run_name}: {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    plt.close(fig)
    payload = {"output": args.output, "points": len(records), "best_step": best.step if best else None}
    _emit(args, payload, lambda: f"wrote {args.output} ({len(records)} checkpoints, best step {payload['best_step']})")
    return EXIT_OK


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A bash (or zsh, through its bashcompinit) completion script for ``ray-ckpt``, made from the
    parser: commands, then each command's options; paths complete as files."""
    parser = parser or build_parser()
    commands: dict[str, list[str]] = {}
    top: list[str] = []
    for action in parser._actions:  # argparse keeps no public list of them
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = sorted({o for a in sub._actions for o in a.option_strings})
        else:
            top += action.option_strings
    cases = "\n".join(f'        {name}) words="{" ".join(opts)}" ;;' for name, opts in sorted(commands.items()))
    script = f"""# ray-ckpt completion ({shell}); generated by `ray-ckpt completion {shell}`
_ray_ckpt() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd="" words="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in -*) ;; *) cmd=${{COMP_WORDS[i]}}; break ;; esac
    done
    case $cmd in
{cases}
        "") words="{" ".join(sorted(set(top)))} {" ".join(sorted(commands))}" ;;
    esac
    if [[ $cmd == completion && $cur != -* ]]; then
        words="bash zsh"
    elif [[ -n $cmd && $cur != -* ]]; then
        COMPREPLY=()  # a path or URI: the shell's file completion (complete -o default)
        return 0
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _ray_ckpt ray-ckpt
"""
    if shell == "zsh":
        script = "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the completion script of ``args.shell``."""
    sys.stdout.write(completion_script(args.shell))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser and entry point.
# ---------------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help=f"fsspec storage option, repeatable (e.g. endpoint_url=http://host:9000); also ${STORAGE_OPTIONS_ENV}",
    )
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    return common


def _checkpoint_selector_args(p: argparse.ArgumentParser) -> None:
    """Options of commands that address one checkpoint (``:best`` ranking, legacy pickles)."""
    p.add_argument("--metric", help="rank :best by this metric")
    p.add_argument("--mode", choices=("max", "min"))
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling legacy .pt files")


def _ranking_args(parser: argparse.ArgumentParser, *, ranking: bool = True, retention: bool = True) -> None:
    if ranking:
        parser.add_argument("--metric", help="rank by this metric (default: what the run recorded)")
        parser.add_argument("--mode", choices=("max", "min"), help="whether higher or lower is better")
    if retention:
        parser.add_argument("--keep-top-k", type=int, help="retention: keep the K best")
        parser.add_argument("--keep-last-n", type=int, help="retention: keep the N newest")
        parser.add_argument("--keep-period", type=int, help="retention: keep every step divisible by P")


def _allow_architecture_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-architecture",
        action="append",
        metavar="PREFIX",
        help="also allow model classes under this module prefix (repeatable) to be rebuilt and recorded in "
        "model_architecture.json; default: torch.nn and transformers only",
    )


class UsageError(Exception):
    """Bad command-line arguments (exit 2), raised instead of argparse printing and exiting;
    ``parser`` is the (sub)command's parser whose usage is shown."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach :func:`main` (so ``--json`` can report them as JSON)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message, self)


def _asks_version(argv: Sequence[str]) -> bool:
    """Whether ``--version`` comes before any command (``ray-ckpt --version [--json]``)."""
    for arg in argv:
        if arg == "--version":
            return True
        if not arg.startswith("-"):
            return False
    return False


def version() -> str:
    """The installed ray-ckpt version (from the package metadata)."""
    try:
        return metadata.version("ray-ckpt")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _command(sub: Any, common: argparse.ArgumentParser, name: str, summary: str, details: str = "") -> Any:
    """A subcommand whose ``-h`` starts with what it does (``summary``, the line ``ray-ckpt -h`` lists)."""
    sentence = summary[0].upper() + summary[1:] + "."
    return sub.add_parser(
        name,
        parents=[common],
        help=summary,
        description=f"{sentence} {details}".strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``ray-ckpt`` and its subcommands."""
    common = _common()
    parser = _Parser(
        prog="ray-ckpt",
        parents=[common],
        description="Inspect, verify, copy, migrate, import, export, download and plot ray-ckpt checkpoints.",
        epilog=f"Selectors: {SELECTOR_GRAMMAR}. Exit codes: 0 ok, 1 error or corruption, 2 usage, "
        "130 interrupted. Shell completion: ray-ckpt completion bash|zsh. See docs/CLI.md.",
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version and exit (with --json: a JSON object)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = _command(sub, common, "ls", "list a run's checkpoints with metrics and marks, or the runs under a storage root")
    p.add_argument(
        "run_uri", metavar="RUN_URI", help=RUN_URI_NO_SELECTOR_HELP + "; a directory holding runs lists its runs"
    )
    _ranking_args(p)
    p.set_defaults(func=cmd_ls)

    p = _command(sub, common, "best", "the top-k checkpoints of a run by its metric (or --metric)")
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_NO_SELECTOR_HELP)
    p.add_argument("-k", type=int, default=1, help="how many (default 1)")
    _ranking_args(p, retention=False)
    p.set_defaults(func=cmd_best)

    p = _command(sub, common, "inspect", "show a checkpoint's keys, shapes, dtypes, sizes, metrics and architecture")
    p.add_argument("ckpt_uri", metavar="CKPT_URI", help=CKPT_URI_HELP)
    _checkpoint_selector_args(p)
    p.set_defaults(func=cmd_inspect)

    p = _command(
        sub, common, "verify", "check a run's or a checkpoint's sizes, checksums and structure; exit 1 on corruption",
        "Anything that is neither a run, a step nor a checkpoint is an error.",
    )  # fmt: skip
    p.add_argument(
        "uri", metavar="RUN_URI|CKPT_URI", help="a run (every step is verified) or one checkpoint: " + CKPT_URI_HELP
    )
    _checkpoint_selector_args(p)
    p.set_defaults(func=cmd_verify)

    p = _command(sub, common, "gc", "remove uncommitted leftovers and show what retention would delete")
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_NO_SELECTOR_HELP)
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    p.add_argument(
        "--apply-retention",
        action="store_true",
        help="also delete the checkpoints retention does not keep (leased ones stay)",
    )
    _ranking_args(p)
    p.set_defaults(func=cmd_gc)

    p = _command(
        sub, common, "retention",
        "show which checkpoints the run's retention keeps and why; --apply deletes the rest (dry run by default)",
    )  # fmt: skip
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_NO_SELECTOR_HELP)
    p.add_argument("--apply", action="store_true", help="delete the checkpoints no rule keeps (leased ones stay)")
    _ranking_args(p)
    p.add_argument(
        "--keep-checkpoints-without-metrics",
        action="store_true",
        default=None,
        help="retention: also keep steps without a finite metric (needs --keep-top-k or a recorded one)",
    )
    p.set_defaults(func=cmd_retention)

    p = _command(
        sub, common, "migrate", "turn legacy checkpoint files and Hugging Face model folders into ray-ckpt runs"
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="a legacy checkpoint file, a model folder or a directory of them (searched recursively)",
    )
    p.add_argument("dst", metavar="DST", help="storage URI under which one run per run name is written")
    p.add_argument("--dry-run", action="store_true", help="report what would happen; write nothing")
    p.add_argument("--replace", action="store_true", help="replace steps that were already migrated")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling whole-model .pt files")
    _allow_architecture_arg(p)
    p.set_defaults(func=cmd_migrate)

    p = _command(
        sub, common, "import",
        "commit one model folder, legacy file or downloaded step as a step of a run",
        "A folder `ray-ckpt download` wrote is committed as the same step, with its metrics, trainer state, "
        "scores and architecture.",
    )  # fmt: skip
    p.add_argument(
        "src", metavar="SOURCE",
        help="a step folder from `download`, a Hugging Face model folder (save_pretrained, huggingface_hub, DCP), "
        "its model.safetensors.index.json, or a legacy file",
    )  # fmt: skip
    p.add_argument("run_uri", metavar="DEST_RUN_URI", help="the run to import into: <storage>/<run_name>, no selector")
    p.add_argument("--step", type=int, help="the step to commit (default: what the source records, else 0)")
    p.add_argument("--dry-run", action="store_true", help="report what would happen; write nothing")
    p.add_argument("--replace", action="store_true", help="replace the step if it exists with other content")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling whole-model .pt files")
    _allow_architecture_arg(p)
    p.set_defaults(func=cmd_import)

    p = _command(
        sub, common, "cp", "copy one committed step into another run, on any storage, checksum-checked",
        "The step keeps its number, metrics, metadata, trainer state and eval scores; the run's architecture "
        "comes along when the destination records none.",
    )  # fmt: skip
    p.add_argument("run_uri", metavar="SRC_RUN_URI", help=RUN_URI_HELP)
    p.add_argument("dest", metavar="DEST_RUN_URI", help="the run to copy into: <storage>/<run_name>, no selector")
    p.add_argument("--replace", action="store_true", help="replace the step if the destination has it")
    _ranking_args(p, retention=False)
    p.set_defaults(func=cmd_cp)

    p = _command(
        sub, common, "export",
        "write a step as a standalone Hugging Face folder (shards, index, config.json) that from_pretrained reads",
    )  # fmt: skip
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_HELP)
    p.add_argument("dest", metavar="DEST_DIR", help="the folder to write (a path, or any storage URI)")
    p.add_argument("--overwrite", action="store_true", help="write into a destination that is not empty")
    _ranking_args(p, retention=False)
    p.set_defaults(func=cmd_export)

    p = _command(
        sub, common, "download", "copy every file of a committed step, checksum-verified, to a directory",
        "With the marker, the run's architecture and the step's scores: `import` of the folder commits the "
        "same step again.",
    )  # fmt: skip
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_HELP)
    p.add_argument("dest", metavar="DEST_DIR", help="the local directory to write")
    p.add_argument("--overwrite", action="store_true", help="write into a destination that is not empty")
    _ranking_args(p, retention=False)
    p.set_defaults(func=cmd_download)

    p = _command(sub, common, "plot", "plot a metric against step, kept, leased and best checkpoints marked")
    p.add_argument("run_uri", metavar="RUN_URI", help=RUN_URI_NO_SELECTOR_HELP)
    p.add_argument("--metric", help="the metric to plot (default: the one the run ranks by)")
    p.add_argument("--mode", choices=("max", "min"), help="which way is best (default: the run's, else min)")
    p.add_argument("-o", "--output", required=True, help="output image (PNG)")
    _ranking_args(p, ranking=False)
    p.set_defaults(func=cmd_plot)

    p = _command(
        sub, common, "completion", "print a shell completion script for bash or zsh",
        "bash: eval \"$(ray-ckpt completion bash)\" (e.g. in ~/.bashrc); "
        "zsh: eval \"$(ray-ckpt completion zsh)\" (e.g. in ~/.zshrc).",
    )  # fmt: skip
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    p.set_defaults(func=cmd_completion)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.args and len(exc.args) >= 2 and exc.strerror:
        text = exc.strerror if not exc.filename else f"{exc.filename}: {exc.strerror}"
    return (text.splitlines() or [type(exc).__name__])[0]


def _error_exit(exc: BaseException, code: int, command: str | None, as_json: bool) -> int:
    """Report an error as one line on stderr (``ray-ckpt COMMAND: error: ...``, the program named
    once), or as a JSON object on stdout under ``--json``."""
    message = _one_line(exc)
    if as_json:
        print(json.dumps({"error": message, "type": type(exc).__name__, "exit_code": code}), flush=True)
    else:
        print(f"{command or 'ray-ckpt'}: error: {message}", file=sys.stderr)
    return code


def _quiet_broken_pipe() -> int:
    """stdout's reader went away: point stdout at /dev/null (so the interpreter's final flush
    stays quiet) and exit as coreutils do."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ray-ckpt``; returns the exit status (0 ok, 1 error or corruption, 2 usage, 130 interrupted).

    Run as the program (``argv`` None), a closed stdout ends it silently, as standard tools
    do: SIGPIPE gets its default action back.
    """
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from ray_ckpt.cli.lazyimport import defer_import

    defer_import("torch")  # imported where a command first touches a tensor: listing never does
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        return _run(argv, as_json)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _run(argv: list[str], as_json: bool) -> int:
    parser = build_parser()
    if _asks_version(argv):
        if as_json:
            print(json.dumps({"name": "ray-ckpt", "version": version()}), flush=True)
        else:
            print(f"ray-ckpt {version()}", flush=True)
        return EXIT_OK
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        if not as_json:
            exc.parser.print_usage(sys.stderr)
        return _error_exit(exc, EXIT_USAGE, exc.parser.prog, as_json)
    except SystemExit as exc:  # --help: argparse already printed
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="ray-ckpt: %(levelname)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("ray-ckpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        code = exc.code if isinstance(exc, CommandError) else EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR
        return _error_exit(exc, code, f"ray-ckpt {args.command}", as_json)


if __name__ == "__main__":
    sys.exit(main())
