"""What each ``ray-ckpt`` command does: open the run or file it names, act, return the result.

A command takes the parsed arguments and returns a :class:`Result`: the payload ``--json``
prints, the name of the view of :mod:`ray_ckpt.cli.render` that shows it as text, and the exit
status. Commands print nothing themselves except progress (bars and ``migrate``'s lines, through
the render module). Everything goes through the library: the store for runs,
:mod:`ray_ckpt.interop.legacy` for legacy files and model folders, :mod:`ray_ckpt.interop.migrate`
for migration and import. torch is imported only where a command touches a tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_ckpt.cli.render import byte_progress, fmt_number, migrate_line, one_line
from ray_ckpt.core.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RayCkptError,
    StorageError,
)

if TYPE_CHECKING:  # annotations only: the modules themselves are imported where a command needs them
    from ray_ckpt.core.store import CheckpointStore
    from ray_ckpt.core.uri import ParsedURI
    from ray_ckpt.interop.artifact import CheckpointArtifact

EXIT_OK = 0
EXIT_ERROR = 1  # corruption, a missing run or checkpoint, a failed migration
EXIT_USAGE = 2  # bad arguments or a malformed URI
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE), as coreutils exit
STORAGE_OPTIONS_ENV = "RAY_CKPT_STORAGE_OPTIONS"
# The durability entry of a step held in the memory tier (ray_ckpt.distributed.memory.MEMORY, which
# imports Ray: named here so that ls of storage never does).
MEMORY_TIER = "memory"
# The ranking and retention fields a command line may override (--metric sets metric_name).
POLICY_FIELDS = ("metric_name", "mode", "keep_top_k", "keep_last_n", "keep_period", "keep_checkpoints_without_metrics")


class CommandError(Exception):
    """A failure the CLI reports as one line with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    """What a command found: ``payload`` (printed as JSON under ``--json``), the name of the view
    that shows it as text, what that view needs beyond the payload, and the exit status."""

    payload: Any
    view: str
    context: dict[str, Any] = field(default_factory=dict)
    code: int = EXIT_OK


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


def _open(
    args: argparse.Namespace,
    uri: str | None = None,
    *,
    must_exist: bool = True,
    policy: dict[str, Any] | None = None,
) -> tuple[CheckpointStore, ParsedURI]:
    """The run a command names, through :func:`~ray_ckpt.interop.artifact.open_run` (ConfigError, exit 2,
    for a URI that names no run), with the ranking/retention options given on the command line.

    ``policy`` (a live checkpointer's) stands in for the recorded policy where the command line
    gives no option; ``must_exist=False`` opens a run that has nothing on storage yet."""
    from ray_ckpt.core.uri import parse_uri
    from ray_ckpt.interop.artifact import open_run

    given = {field: getattr(args, "metric" if field == "metric_name" else field, None) for field in POLICY_FIELDS}
    if policy:
        if given["metric_name"] is not None:  # another metric: the checkpointer's mode is not its
            policy = {k: v for k, v in policy.items() if k not in ("metric_name", "mode")}
        given = {k: policy.get(k) if v is None else v for k, v in given.items()}
    parsed = parse_uri(uri or args.run_uri)
    store = open_run(parsed, _storage_options(args), must_exist=must_exist, **given)
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


def _ls_runs(location: str, runs: list[CheckpointStore]) -> Result:
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

    return Result({"storage": location, "runs": rows}, "runs")


def cmd_ls(args: argparse.Namespace) -> Result:
    """A run's checkpoints from its storage (persisted steps), or with ``--address`` as the run's
    live checkpointer serves them (memory-only steps too); or the runs under a storage root."""
    from ray_ckpt.core.uri import parse_uri

    _whole_run(args)
    parsed = parse_uri(args.run_uri)
    address = getattr(args, "address", None)
    live: dict[str, Any] | None = None
    if address is None:
        if getattr(args, "namespace", None) is not None:
            raise CommandError("--namespace: only with --address (where the live checkpointer runs)", EXIT_USAGE)
        runs = _runs_under(args, parsed)
        if runs is not None:
            return _ls_runs(parsed.location, runs)
        store, _ = _open(args)
        records = store.list()
        keep, leased, best = _marks(store)
    else:
        store, records, best, live = _served_index(args, address, parsed)
        keep, leased, _ = _marks(store)
    cfg = store.config
    payload = {
        "run": store.uri,
        "metric_name": cfg.metric_name,
        "mode": cfg.mode,
        "source": "storage" if live is None else "checkpointer",
        "retention": {k: v for k, v in store.policy().items() if k not in ("metric_name", "mode")},
        "checkpoints": [
            {
                "step": r.step,
                "uri": r.uri,
                "created": r.created,
                "total_size": r.total_size,
                "files_size": r.files_size,
                "metrics": r.metrics,
                "where": list(r.durability),
                # retention applies to persisted steps only; memory_keep_last keeps those only in memory
                "kept": None if list(r.durability) == [MEMORY_TIER] else r.step in keep,
                "best": r.step == best,
                "leased": r.step in leased,
            }
            for r in records
        ],
    }
    if live is not None:
        payload["checkpointer"] = live
    return Result(payload, "ls")


def _served_index(
    args: argparse.Namespace, address: str, parsed: ParsedURI
) -> tuple[CheckpointStore, list[Any], int | None, dict[str, Any]]:
    """(the run's store, its records, its best step, which checkpointer) as the run's live
    checkpointer serves them: its index also lists the steps held only in memory.

    Connects to the Ray cluster at ``address`` (Ray is imported here only) and finds the run's
    checkpointer in ``--namespace``, else in whichever namespace holds it; it must serve this
    run's storage. Retention marks come from the storage, under the checkpointer's policy unless
    the command line gives options.
    """
    import ray

    from ray_ckpt.core.storage.storage import Storage
    from ray_ckpt.distributed.handle import actor_name, get_checkpointer

    namespace = args.namespace
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
            raise CommandError(f"--address {address}: cannot connect to the Ray cluster: {one_line(exc)}") from exc
    try:
        name = actor_name(parsed.run_name)
        if namespace is None:
            found = sorted(
                {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name}
            )
            if len(found) > 1:
                raise CommandError(
                    f"run {parsed.run_name!r}: checkpointers in namespaces {found} on {address}; "
                    "pick one with --namespace"
                )
            namespace = found[0] if found else None
        try:
            handle = get_checkpointer(parsed.run_name, namespace, timeout_s=0)
        except LookupError:
            where = f"namespace {namespace!r}" if namespace is not None else "any namespace"
            raise CommandError(
                f"run {parsed.run_name!r}: no checkpointer runs on {address} ({where}); without --address, "
                f"ls lists the steps persisted on storage"
            ) from None
        cfg = handle.config
        served = Storage(posixpath.join(Storage(cfg.storage_uri, cfg.storage_options).uri, cfg.run_name)).uri
        if served != Storage(parsed.location).uri:
            raise CommandError(
                f"run {parsed.run_name!r}: the checkpointer on {address} serves {served}, not {parsed.location}"
            )
        policy = {k: v for k, v in cfg.to_dict().items() if k in POLICY_FIELDS}
        store, _ = _open(args, must_exist=False, policy=policy)
        records = handle.list()
        metric = store.config.metric_name
        best = handle.best(metric, store.config.mode) if metric else None
        live = {"address": address, "namespace": namespace, "actor": name}
        return store, records, best.step if best is not None else None, live
    finally:
        if started:
            ray.shutdown()


def cmd_best(args: argparse.Namespace) -> Result:
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

    return Result(payload, "best")


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


def cmd_inspect(args: argparse.Namespace) -> Result:
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

    return Result(payload, "inspect")


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


def cmd_verify(args: argparse.Namespace) -> Result:
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
            results.append({"uri": parsed.location, "step": None, "ok": False, "error": one_line(exc)})
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
                        "error": one_line(exc),
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
                    results.append({"uri": target, "step": step, "ok": False, "error": one_line(exc)})
                advance(sizes.get(step, 0), f"step {step}")
        if not steps and parsed.kind == "run" and parsed.selector is None:
            results.append({"uri": store.uri, "step": None, "ok": True, "error": None, "note": "no checkpoints"})
    ok = all(r["ok"] for r in results)
    payload = {"ok": ok, "results": results}

    return Result(payload, "verify", code=EXIT_OK if ok else EXIT_ERROR)


def cmd_gc(args: argparse.Namespace) -> Result:
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

    return Result(payload, "gc", {"apply_retention": args.apply_retention})


def cmd_retention(args: argparse.Namespace) -> Result:
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

    return Result(payload, "retention", {"metric": metric})


def cmd_migrate(args: argparse.Namespace) -> Result:
    from ray_ckpt.interop.migrate import migrate

    as_json = _json(args)
    with contextlib.ExitStack() as stack:
        advance: list[Callable[..., None]] = []

        def on_plan(plan: list[tuple[str, int]]) -> None:
            total = sum(n for _, n in plan)
            advance.append(stack.enter_context(byte_progress("migrate", total, enabled=not as_json)))

        def on_item(item: Any) -> None:
            if not as_json:
                migrate_line(item)
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
    payload = {"ok": report.ok, "items": [i.to_dict() for i in report.items]}
    context = {"counts": report.counts(), "dry_run": args.dry_run}
    return Result(payload, "migrate", context, code=EXIT_OK if report.ok else EXIT_ERROR)


def cmd_import(args: argparse.Namespace) -> Result:
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

    return Result(payload, "import", code=EXIT_OK if item.ok else EXIT_ERROR)


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


def cmd_export(args: argparse.Namespace) -> Result:
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

    return Result(payload, "export")


def cmd_download(args: argparse.Namespace) -> Result:
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

    return Result(payload, "download")


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


def cmd_cp(args: argparse.Namespace) -> Result:
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

    return Result(payload, "cp", {"source_run": store.uri})


def _import_step_folder(args: argparse.Namespace, storage: Any, manifest: Any) -> Result:
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
    return Result(payload, "import_folder")


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


def cmd_plot(args: argparse.Namespace) -> Result:
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
            f"{fmt_number(best.metrics[metric])}",
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
    return Result(payload, "plot")
