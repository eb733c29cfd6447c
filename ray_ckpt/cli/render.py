"""How ``ray-ckpt`` shows what a command found: rich tables and progress bars on a terminal, plain
text on a pipe, JSON under ``--json``.

Each command of :mod:`ray_ckpt.cli.commands` returns a :class:`~ray_ckpt.cli.commands.Result`: its
JSON payload and the name of the view here that turns that payload into text. Views read only
the payload (and the result's ``context``: what the text says but the JSON does not carry), so
what a command does and how it is shown change apart. rich is imported inside the functions
that draw: ``--help`` and ``--version`` never import it.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: rich is imported where something is drawn
    from rich.table import Table

    from ray_ckpt.cli.commands import Result


def human_size(n: int | float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as the config's size parser uses; rich's formatter)."""
    from rich.filesize import decimal

    return decimal(int(n))


def fmt_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def stdout_is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table: ruled and styled on a terminal, plain aligned columns on a pipe."""
    from rich import box
    from rich.table import Table

    terminal = stdout_is_terminal()
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


def show(parts: Any) -> None:
    """Print text and tables on stdout: through rich on a terminal, as plain text on a pipe."""
    from rich.console import Console

    items = list(parts) if isinstance(parts, (list, tuple)) else [parts]
    if stdout_is_terminal():
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


def one_line(exc: BaseException) -> str:
    """An error as the one line the CLI shows (an OSError as ``path: reason``)."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.args and len(exc.args) >= 2 and exc.strerror:
        text = exc.strerror if not exc.filename else f"{exc.filename}: {exc.strerror}"
    return (text.splitlines() or [type(exc).__name__])[0]


def emit(as_json: bool, result: Result) -> None:
    """A command's result: its payload as JSON under ``--json``, else its view (text and tables)."""
    if as_json:
        print(json.dumps(result.payload, indent=2, default=str), flush=True)
    else:
        show(VIEWS[result.view](result.payload, **result.context))


# ---------------------------------------------------------------------------------------------
# Views: one per kind of result, from its payload to text and tables.
# ---------------------------------------------------------------------------------------------
def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={fmt_number(v)}" for k, v in sorted(metrics.items()))


def runs_view(payload: dict[str, Any]) -> list[Any]:
    """``ls`` of a storage root: one row per run."""
    rows = payload["runs"]
    table = render_table(
        ["run", "checkpoints", "latest", "best", "size", "updated"],
        [
            (
                r["run"],
                r["checkpoints"],
                "-" if r["latest_step"] is None else r["latest_step"],
                "-" if r["best_step"] is None else f"{r['best_step']} ({r['metric_name']})",
                human_size(r["files_size"]),
                fmt_time(r["updated"]),
            )
            for r in rows
        ],
    )
    return [f"storage {payload['storage']}: {len(rows)} run(s)", table]


def ls_view(payload: dict[str, Any]) -> str | list[Any]:
    """``ls`` of a run: its checkpoints with what retention does to each."""
    records = payload["checkpoints"]
    metric, mode = payload["metric_name"], payload["mode"]
    ranking = f"{metric} ({mode})" if metric else "none"
    live = payload.get("checkpointer")
    head = f"run {payload['run']}: {len(records)} checkpoint(s); ranked by {ranking}"
    if live is not None:
        head += f"; as its checkpointer at {live['address']} serves them"
    if not records:
        return head

    def marks(r: dict[str, Any]) -> str:
        kept = [] if r["kept"] is None else ["kept" if r["kept"] else "would-delete"]
        return ",".join(kept + [m for m in ("best", "leased") if r[m]]) or "-"

    table = render_table(
        ["step", "created", "size", "where", "marks", "metrics"],
        [(r["step"], fmt_time(r["created"]), human_size(r["files_size"]), ",".join(r["where"]), marks(r),
          _metrics_text(r["metrics"])) for r in records],
    )  # fmt: skip
    return [head, table]


def best_view(payload: dict[str, Any]) -> Any:
    metric, mode = payload["metric_name"], payload["mode"]
    return render_table(
        ["rank", "step", f"{metric} ({mode})", "uri"],
        [(p["rank"], p["step"], fmt_number(p["value"]), p["uri"]) for p in payload["checkpoints"]],
    )


def inspect_view(payload: dict[str, Any]) -> list[Any]:
    lines = [
        f"checkpoint   {payload['uri']}",
        f"run / step   {payload['run_name']} / {payload['step']}",
        f"format       {payload['format']}",
        f"tensors      {len(payload['tensors'])} ({human_size(payload['total_size'])})",
    ]
    if payload.get("created"):
        lines.append(f"created      {fmt_time(payload['created'])}")
    arch = payload.get("architecture")
    config = json.dumps(arch["config"], sort_keys=True) if arch else ""
    lines.append(f"architecture {arch['class_path']} {config}" if arch else "architecture -")
    lines.append("metrics      " + (_metrics_text(payload.get("metrics") or {}) or "-"))
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


def verify_view(payload: dict[str, Any]) -> str:
    results = payload["results"]
    lines = [
        f"{'ok' if r['ok'] else 'CORRUPT':8} {r['uri']}" + (f"  {r['error']}" if r["error"] else "") for r in results
    ]
    bad = sum(not r["ok"] for r in results)
    lines.append(f"{len(results) - bad} ok, {bad} corrupt")
    return "\n".join(lines)


def gc_view(payload: dict[str, Any], *, apply_retention: bool) -> str:
    dry_run, removed = payload["dry_run"], payload["leftovers"]
    doomed, deleted = payload["retention_would_delete"], payload["retention_deleted"]
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(removed)} uncommitted leftover(s)"] + [f"  {p}" for p in removed]
    if deleted:
        lines.append(f"retention deleted steps {deleted}")
    elif doomed and not apply_retention:
        lines.append(f"retention would delete steps {doomed} (pass --apply-retention to delete them)")
    elif doomed:
        lines.append(
            f"retention would delete steps {doomed} (not deleted: dry run)"
            if dry_run
            else f"retention deleted nothing: steps {doomed} were leased meanwhile"
        )
    else:
        lines.append("retention would delete nothing")
    return "\n".join(lines)


def retention_view(payload: dict[str, Any], *, metric: str | None) -> str | list[Any]:
    rows, policy = payload["steps"], payload["policy"]
    doomed, deleted = payload["would_delete"], payload["deleted"]
    rules = ", ".join(f"{name}={value}" for name, value in policy.items() if value is not None)
    head = f"run {payload['run']}: {len(rows)} checkpoint(s); retention {rules}"
    if not rows:
        return head
    table = render_table(
        ["step", "action", "kept by", metric or "metric"],
        [
            (
                r["step"],
                r["action"],
                ",".join(r["reasons"]) or "-",
                fmt_number(r["metric"]) if r["metric"] is not None else "-",
            )
            for r in rows
        ],
    )
    if not payload["dry_run"]:
        tail = f"deleted {len(deleted)} step(s): {deleted}" if deleted else "deleted nothing"
        if set(doomed) - set(deleted):
            tail += f" (kept {sorted(set(doomed) - set(deleted))}: leased meanwhile)"
    elif doomed:
        tail = f"would delete {len(doomed)} step(s): {doomed} (dry run; pass --apply to delete)"
    else:
        tail = "nothing to delete" + (
            ""
            if policy.get("keep_top_k") is not None or policy.get("keep_last_n") is not None
            else " (neither keep_top_k nor keep_last_n is set)"
        )
    return [head, table, tail]


def migrate_line(item: Any) -> None:
    """One line per file ``migrate`` handled, printed as it goes."""
    where = f"{item.run_name} step {item.step}" if item.run_name is not None else ""
    print(f"{item.action:14} {item.source}  {where}  {item.detail}".rstrip(), flush=True)


def migrate_view(payload: dict[str, Any], *, counts: dict[str, int], dry_run: bool) -> str:
    text = ", ".join(f"{n} {action}" for action, n in sorted(counts.items())) or "no legacy files"
    return f"{'dry run: ' if dry_run else ''}{text}"


def import_folder_view(payload: dict[str, Any]) -> str:
    """``import`` of a downloaded step folder."""
    return f"{payload['action']} {payload['source']} -> run {payload['run']} step {payload['step']}"


def import_view(payload: dict[str, Any]) -> str:
    """``import`` of a model folder or a legacy file."""
    return (
        f"{payload['action']} {payload['source']} -> run {payload['run_name']} step {payload['step']}  "
        f"{payload['detail']}"
    ).rstrip()


def export_view(payload: dict[str, Any]) -> str:
    files = payload["files"]
    text = (
        f"exported step {payload['step']} of {payload['run']} to {payload['dest']}: {len(files)} files "
        f"({human_size(payload['total_size'])})"
    )
    return text + (f"\nnote: {payload['note']}" if payload.get("note") else "")


def download_view(payload: dict[str, Any]) -> str:
    size = human_size(payload["total_size"])
    return (
        f"downloaded step {payload['step']} of {payload['run']} to {payload['dest']}: "
        f"{len(payload['files'])} files ({size}), checksums ok"
    )


def cp_view(payload: dict[str, Any], *, source_run: str) -> str:
    return (
        f"copied step {payload['step']} of {source_run} to {payload['uri']}: {payload['files']} files "
        f"({human_size(payload['total_size'])}), checksums ok"
    )


def plot_view(payload: dict[str, Any]) -> str:
    return f"wrote {payload['output']} ({payload['points']} checkpoints, best step {payload['best_step']})"


VIEWS: dict[str, Callable[..., Any]] = {
    "runs": runs_view,
    "ls": ls_view,
    "best": best_view,
    "inspect": inspect_view,
    "verify": verify_view,
    "gc": gc_view,
    "retention": retention_view,
    "migrate": migrate_view,
    "import": import_view,
    "import_folder": import_folder_view,
    "export": export_view,
    "download": download_view,
    "cp": cp_view,
    "plot": plot_view,
}
