"""The ``ray-ckpt`` command line: list, rank, inspect, verify, retain, collect, migrate and plot checkpoints.

Human-readable tables by default, ``--json`` for scripts. Errors exit non-zero with a one-line
message (``--debug`` shows the traceback). Everything goes through the library: the store for
runs, :mod:`ray_ckpt.legacy` for legacy files, :mod:`ray_ckpt.migrate` for migration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ray_ckpt.artifact import CheckpointArtifact, load_from_uri, open_run
from ray_ckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RayCkptError,
)
from ray_ckpt.format import read_safetensors_header
from ray_ckpt.layout import CHECKPOINTS_DIR, MARKER_FILE, TRAINER_TENSORS, parse_step_dir, step_dir
from ray_ckpt.retention import LEASED, explain, policy_from_config
from ray_ckpt.safejson import parse_json
from ray_ckpt.store import CheckpointStore
from ray_ckpt.uri import ParsedURI, parse_uri

EXIT_OK = 0
EXIT_ERROR = 1  # corruption, a missing run or checkpoint, a failed migration
EXIT_USAGE = 2  # bad arguments or a malformed URI
STORAGE_OPTIONS_ENV = "RAY_CKPT_STORAGE_OPTIONS"

logger = logging.getLogger("ray_ckpt.cli")


class CommandError(Exception):
    """A failure the CLI reports as one line with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Output helpers.
# ---------------------------------------------------------------------------------------------
def human_size(n: int | float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as the config's size parser uses)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _fmt_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def _fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Progress:
    """A one-line progress indicator on stderr, shown only when stderr is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.enabled = sys.stderr.isatty() and total > 1
        self.count = 0

    def advance(self, what: str = "") -> None:
        self.count += 1
        if self.enabled:
            width = 24
            filled = int(width * self.count / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.count}/{self.total} {what[:40]:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _emit(args: argparse.Namespace, payload: Any, human: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(human())


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
    """The run a command names, through :func:`~ray_ckpt.artifact.open_run` (ConfigError, exit 2,
    for a URI that names no run), with the ranking/retention options given on the command line."""
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


def _marks(store: CheckpointStore) -> tuple[set[int], set[int], int | None]:
    """(steps retention keeps, leased steps, best step) of a run as configured."""
    leased = store.leased_steps()
    keep, _ = store.retention_plan(leased)
    best = store.best()  # None when the run ranks nothing
    return set(keep), leased, best.step if best is not None else None


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
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
        return f"{head}\n{table}"

    _emit(args, payload, human)
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    store, _ = _open(args)
    cfg = store.config
    if cfg.metric_name is None:
        raise CommandError(f"{store.uri}: the run records no ranking metric; pass --metric NAME", EXIT_USAGE)
    if args.k < 1:
        raise CommandError(f"-k: must be at least 1, got {args.k}", EXIT_USAGE)
    top = store.top_k(args.k)
    if not top:
        raise CommandError(f"{store.uri}: no checkpoint has a finite {cfg.metric_name!r}")
    payload = [
        {"rank": i + 1, "step": r.step, "metric": cfg.metric_name, "value": r.metrics[cfg.metric_name], "uri": r.uri}
        for i, r in enumerate(top)
    ]

    def human() -> str:
        return render_table(
            ["rank", "step", f"{cfg.metric_name} ({cfg.mode})", "uri"],
            [(p["rank"], p["step"], _fmt_number(p["value"]), p["uri"]) for p in payload],
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
            "class_path": arch.class_path, "config": arch.config, "config_class": arch.config_class
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
            {"key": prefix, "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape),
             "nbytes": state.numel() * state.element_size(), "file": ""}
        ]
    if isinstance(state, dict):
        for k, v in state.items():
            rows += _tensor_rows(v, f"{prefix}.{k}" if prefix else str(k))
    return rows


def _inspect_file(args: argparse.Namespace, parsed: ParsedURI) -> dict[str, Any]:
    from ray_ckpt.legacy import detect_format, numeric_leaves
    from ray_ckpt.storage import Storage

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


def cmd_inspect(args: argparse.Namespace) -> int:
    parsed = parse_uri(args.ckpt_uri)
    if parsed.kind == "file":
        payload = _inspect_file(args, parsed)
    elif parsed.kind == "mock":
        artifact = load_from_uri(args.ckpt_uri)
        arch = artifact.architecture
        payload = {
            "uri": artifact.uri, "run_name": artifact.run_name, "step": artifact.step, "format": "mock",
            "metrics": {}, "metadata": {},
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
        return "\n".join(lines) + "\n\n" + table

    _emit(args, payload, human)
    return EXIT_OK


def _marked_steps(store: CheckpointStore) -> list[int]:
    """Every step directory with a commit marker, including ones whose marker is unreadable."""
    steps = []
    for name in store.storage.list_names(CHECKPOINTS_DIR):
        step = parse_step_dir(name)
        if step is not None and store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            steps.append(step)
    return sorted(steps)


def cmd_verify(args: argparse.Namespace) -> int:
    parsed = parse_uri(args.uri)
    results: list[dict[str, Any]] = []
    if parsed.kind in ("file", "mock"):
        try:
            artifact = load_from_uri(args.uri, storage_options=_storage_options(args), trust_pickle=args.trust_pickle)
            results.append({"target": parsed.location, "step": artifact.step, "ok": True, "error": None})
        except (CorruptCheckpointError, RayCkptError) as exc:
            results.append({"target": parsed.location, "step": None, "ok": False, "error": _one_line(exc)})
    else:
        store, _ = _open(args, args.uri)
        if parsed.kind == "step" or parsed.selector is not None:
            steps = [store.resolve(parsed.selector)]
        else:
            steps = _marked_steps(store)
            try:
                store.read_architecture()
            except FileNotFoundError:
                pass
            except CorruptCheckpointError as exc:
                results.append({"target": f"{store.uri}/model_architecture.json", "step": None, "ok": False,
                                "error": _one_line(exc)})
        progress = Progress(len(steps), "verify")
        for step in steps:
            target = store.step_uri(step)
            try:
                store.verify(step)
                results.append({"target": target, "step": step, "ok": True, "error": None})
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                results.append({"target": target, "step": step, "ok": False, "error": _one_line(exc)})
            progress.advance(f"step {step}")
        progress.close()
        if not steps and parsed.kind == "run" and parsed.selector is None:
            results.append({"target": store.uri, "step": None, "ok": True, "error": None, "note": "no checkpoints"})
    ok = all(r["ok"] for r in results)
    payload = {"ok": ok, "results": results}

    def human() -> str:
        lines = [f"{'ok' if r['ok'] else 'CORRUPT':8} {r['target']}" + (f"  {r['error']}" if r["error"] else "")
                 for r in results]
        bad = sum(not r["ok"] for r in results)
        lines.append(f"{len(results) - bad} ok, {bad} corrupt")
        return "\n".join(lines)

    _emit(args, payload, human)
    return EXIT_OK if ok else EXIT_ERROR


def cmd_gc(args: argparse.Namespace) -> int:
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
            lines.append(f"retention would delete steps {doomed} (not deleted: dry run)" if args.dry_run
                         else f"retention deleted nothing: steps {doomed} were leased meanwhile")
        else:
            lines.append("retention would delete nothing")
        return "\n".join(lines)

    _emit(args, payload, human)
    return EXIT_OK


def cmd_retention(args: argparse.Namespace) -> int:
    """What the run's retention rules keep, and why; ``--apply`` deletes the rest (dry run by default)."""
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
        rules = ", ".join(
            f"{name}={value}" for name, value in store.policy().items() if value is not None
        )
        head = f"run {store.uri}: {len(rows)} checkpoint(s); retention {rules}"
        if not rows:
            return head
        table = render_table(
            ["step", "action", "kept by", metric or "metric"],
            [
                (r["step"], r["action"], ",".join(r["reasons"]) or "-",
                 _fmt_number(r["metric"]) if r["metric"] is not None else "-")
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
            tail = "nothing to delete" + ("" if cfg.keep_top_k is not None or cfg.keep_last_n is not None
                                          else " (neither keep_top_k nor keep_last_n is set)")
        return f"{head}\n{table}\n{tail}"

    _emit(args, payload, human)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from ray_ckpt.migrate import migrate

    as_json = getattr(args, "json", False)

    def on_item(item: Any) -> None:
        if not as_json:
            where = f"{item.run_name} step {item.step}" if item.run_name is not None else ""
            print(f"{item.action:14} {item.source}  {where}  {item.detail}".rstrip(), flush=True)

    report = migrate(
        args.src,
        args.dst,
        dry_run=args.dry_run,
        replace=args.replace,
        trust_pickle=args.trust_pickle,
        storage_options=_storage_options(args),
        on_item=on_item,
        allowed_architecture_prefixes=_allowed_architectures(args),
    )
    if as_json:
        print(json.dumps({"ok": report.ok, "items": [i.to_dict() for i in report.items]}, indent=2))
    else:
        counts = ", ".join(f"{n} {action}" for action, n in sorted(report.counts().items())) or "no legacy files"
        print(f"{'dry run: ' if args.dry_run else ''}{counts}")
    return EXIT_OK if report.ok else EXIT_ERROR


def _allowed_architectures(args: argparse.Namespace) -> list[str] | None:
    """``--allow-architecture`` prefixes: None (the defaults: torch.nn, transformers) when none given."""
    prefixes = getattr(args, "allow_architecture", None)
    if prefixes is None:
        return None
    if not all(p.strip(". ") for p in prefixes):
        raise ConfigError(f"--allow-architecture: expected a module prefix such as mypkg.models, got {prefixes}")
    from ray_ckpt.architecture import DEFAULT_ARCHITECTURE_PREFIXES

    return [*DEFAULT_ARCHITECTURE_PREFIXES, *prefixes]


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parsed = parse_uri(args.run_uri)
    store, _ = _open(argparse.Namespace(**{**vars(args), "metric": None, "mode": None}), args.run_uri)
    metric = args.metric
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
        ax.scatter([best.step], [best.metrics[metric]], marker="*", color="tab:red", s=260, zorder=4,
                   label=f"best ({mode}): step {best.step}")
        ax.annotate(f"{_fmt_number(best.metrics[metric])}", (best.step, best.metrics[metric]),
                    textcoords="offset points", xytext=(8, 8), color="tab:red")
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


# ---------------------------------------------------------------------------------------------
# Parser and entry point.
# ---------------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``ray-ckpt`` and its subcommands."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="ray-ckpt", parents=[common], description="Inspect, verify, migrate and plot ray-ckpt checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", parents=[common], help="list a run's checkpoints with metrics and marks")
    p.add_argument("run_uri", metavar="RUN_URI")
    _ranking_args(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("best", parents=[common], help="the top-k checkpoints by a metric")
    p.add_argument("run_uri", metavar="RUN_URI")
    p.add_argument("-k", type=int, default=1, help="how many (default 1)")
    _ranking_args(p, retention=False)
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("inspect", parents=[common], help="keys, shapes, dtypes, sizes, metrics, architecture")
    p.add_argument("ckpt_uri", metavar="CKPT_URI")
    _checkpoint_selector_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="checksums and structure; exit 1 on any corruption")
    p.add_argument("uri", metavar="RUN_URI|CKPT_URI")
    _checkpoint_selector_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", parents=[common], help="remove uncommitted leftovers; show what retention would delete")
    p.add_argument("run_uri", metavar="RUN_URI")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    p.add_argument("--apply-retention", action="store_true",
                   help="also delete the checkpoints retention does not keep (leased ones stay)")
    _ranking_args(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "retention", parents=[common],
        help="which checkpoints the run's retention keeps and why; --apply deletes the rest (dry run by default)",
    )
    p.add_argument("run_uri", metavar="RUN_URI")
    p.add_argument("--apply", action="store_true", help="delete the checkpoints no rule keeps (leased ones stay)")
    _ranking_args(p)
    p.add_argument("--keep-checkpoints-without-metrics", action="store_true", default=None,
                   help="retention: also keep steps without a finite metric (needs --keep-top-k or a recorded one)")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("migrate", parents=[common], help="legacy checkpoint files into ray-ckpt runs")
    p.add_argument("src", metavar="SRC", help="a legacy checkpoint file or a directory of them")
    p.add_argument("dst", metavar="DST", help="storage URI under which one run per run name is written")
    p.add_argument("--dry-run", action="store_true", help="report what would happen; write nothing")
    p.add_argument("--replace", action="store_true", help="replace steps that were already migrated")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling whole-model .pt files")
    p.add_argument(
        "--allow-architecture",
        action="append",
        metavar="PREFIX",
        help="also allow model classes under this module prefix (repeatable) to be rebuilt and recorded in "
        "model_architecture.json; default: torch.nn and transformers only",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("plot", parents=[common], help="a metric against step, kept and best checkpoints marked")
    p.add_argument("run_uri", metavar="RUN_URI")
    p.add_argument("--metric", required=True)
    p.add_argument("--mode", choices=("max", "min"), help="which way is best (default: the run's, else min)")
    p.add_argument("-o", "--output", required=True, help="output image (PNG)")
    _ranking_args(p, ranking=False)
    p.set_defaults(func=cmd_plot)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.args and len(exc.args) >= 2 and exc.strerror:
        text = exc.strerror if not exc.filename else f"{exc.filename}: {exc.strerror}"
    return (text.splitlines() or [type(exc).__name__])[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ray-ckpt``; returns the exit status (0 ok, 1 error or corruption, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message
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
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        code = exc.code if isinstance(exc, CommandError) else EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR
        print(f"ray-ckpt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
