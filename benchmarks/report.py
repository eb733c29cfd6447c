"""The targets of issue 5 evaluated on a run's cases, and the Markdown tables printed and put in the README."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Cases = dict[str, dict[str, Any]]


def _metric(cases: Cases, name: str, key: str) -> float:
    return float(cases[name]["metrics"][key])


def _ratio(a: str, b: str, key: str = "gbps") -> Callable[[Cases], float]:
    return lambda c: _metric(c, a, key) / _metric(c, b, key)


@dataclass
class Target:
    """One row of the targets table: how to compute the figure from the cases, and the bound it must meet."""

    figure: str
    needs: tuple[str, ...]
    value: Callable[[Cases], float]
    op: str  # ">=" or "<="
    bound: Callable[[Cases], float]
    unit: str = "x"

    def evaluate(self, cases: Cases) -> dict[str, Any]:
        """The figure's value, the bound and pass/short (n/a when a needed case did not run)."""
        if not all(n in cases for n in self.needs):
            return {"figure": self.figure, "value": None, "target": f"{self.op} ?", "status": "n/a"}
        value, bound = self.value(cases), self.bound(cases)
        ok = (operator.ge if self.op == ">=" else operator.le)(value, bound)
        return {
            "figure": self.figure,
            "value": value,
            "bound": bound,
            "unit": self.unit,
            "target": f"{self.op} {_fmt(bound)}{self.unit if self.unit != 'x' else 'x'}",
            "status": "pass" if ok else "short",
        }


def _const(v: float) -> Callable[[Cases], float]:
    return lambda _c: v


TARGETS: list[Target] = [
    Target(
        "durable save vs O_DIRECT write (device limit)",
        ("store_save", "direct_write"),
        _ratio("store_save", "direct_write"),
        ">=",
        _const(0.95),
    ),
    Target(
        "durable save vs safetensors.save_file",
        ("store_save", "safetensors_save_fsync"),
        _ratio("store_save", "safetensors_save_fsync"),
        ">=",
        _const(1.0),
    ),
    Target(
        "durable save vs torch.save",
        ("store_save", "torch_save_fsync"),
        _ratio("store_save", "torch_save_fsync"),
        ">=",
        _const(1.2),
    ),
    Target(
        "durable save vs DCP (best thread_count)",
        ("store_save", "dcp_save"),
        _ratio("store_save", "dcp_save"),
        ">=",
        _const(1.0),
    ),
    Target(
        "end-to-end save, 2 actors, gather, vs O_DIRECT write",
        ("e2e_gather_save", "direct_write"),
        _ratio("e2e_gather_save", "direct_write"),
        ">=",
        _const(0.8),
    ),
    Target(
        "end-to-end save, 2 actors, direct, vs O_DIRECT write",
        ("e2e_direct_save", "direct_write"),
        _ratio("e2e_direct_save", "direct_write"),
        ">=",
        _const(0.8),
    ),
    Target(
        "end-to-end save, 2 actors, gather, vs Ray Train's checkpoint save (medians)",
        ("e2e_gather_save", "ray_train_save"),
        lambda c: _metric(c, "ray_train_save", "median_seconds") / _metric(c, "e2e_gather_save", "median_seconds"),
        ">=",
        _const(1.0),
    ),
    Target(
        "end-to-end save, 2 actors, direct, vs Ray Train's checkpoint save (medians)",
        ("e2e_direct_save", "ray_train_save"),
        lambda c: _metric(c, "ray_train_save", "median_seconds") / _metric(c, "e2e_direct_save", "median_seconds"),
        ">=",
        _const(1.0),
    ),
    Target(
        "async save (gather): loop blocked / sync save",
        ("async_gather_blocked",),
        lambda c: _metric(c, "async_gather_blocked", "ratio"),
        "<=",
        _const(0.2),
    ),
    Target(
        "async save (direct): loop blocked / sync save",
        ("async_direct_blocked",),
        lambda c: _metric(c, "async_direct_blocked", "ratio"),
        "<=",
        _const(0.2),
    ),
    Target(
        "gather bandwidth vs pickled torch tensors",
        ("gather_transfer", "pickled_transfer"),
        _ratio("gather_transfer", "pickled_transfer"),
        ">=",
        _const(10.0),
    ),
    Target(
        "load vs safetensors.load_file (page cache warm)",
        ("store_load_warm", "safetensors_load_warm"),
        _ratio("store_load_warm", "safetensors_load_warm"),
        ">=",
        _const(0.9),
    ),
    Target(
        "load vs torch.load (page cache warm)",
        ("store_load_warm", "torch_load_warm"),
        _ratio("store_load_warm", "torch_load_warm"),
        ">=",
        _const(3.0),
    ),
    Target(
        "load with mmap=True vs torch.load (page cache warm)",
        ("store_load_mmap_warm", "torch_load_warm"),
        _ratio("store_load_mmap_warm", "torch_load_warm"),
        ">=",
        _const(3.0),
    ),
    Target(
        "load with mmap=True, every byte hashed, vs torch.load(mmap=True), nothing read (page cache warm; no target)",
        ("store_load_mmap_warm", "torch_load_mmap_warm"),
        _ratio("store_load_mmap_warm", "torch_load_mmap_warm"),
        ">=",
        _const(1.0),
    ),
    Target(
        "load vs safetensors.load_file (page cache cold)",
        ("store_load_cold", "safetensors_load_cold"),
        _ratio("store_load_cold", "safetensors_load_cold"),
        ">=",
        _const(0.9),
    ),
    Target(
        "load vs torch.load (page cache cold)",
        ("store_load_cold", "torch_load_cold"),
        _ratio("store_load_cold", "torch_load_cold"),
        ">=",
        _const(3.0),
    ),
    Target(
        "load with mmap=True vs torch.load (page cache cold)",
        ("store_load_mmap_cold", "torch_load_cold"),
        _ratio("store_load_mmap_cold", "torch_load_cold"),
        ">=",
        _const(3.0),
    ),
    Target(
        "load with mmap=True, every byte hashed, vs torch.load(mmap=True), nothing read (page cache cold; no target)",
        ("store_load_mmap_cold", "torch_load_mmap_cold"),
        _ratio("store_load_mmap_cold", "torch_load_mmap_cold"),
        ">=",
        _const(1.0),
    ),
    Target(
        "checkpointer peak private RSS growth during a save",
        ("checkpointer_rss",),
        lambda c: _metric(c, "checkpointer_rss", "peak_private_growth_mb"),
        "<=",
        lambda c: _metric(c, "checkpointer_rss", "limit_mb"),
        " MB",
    ),
    Target(
        "top_k p99, EvalClient in eval actors querying during saves",
        ("topk_concurrent",),
        lambda c: _metric(c, "topk_concurrent", "p99_ms"),
        "<=",
        _const(5.0),
        " ms",
    ),
    Target(
        "top_k p99, a call to the checkpointer actor per query, during saves (same target, for reference)",
        ("topk_concurrent",),
        lambda c: float(c["topk_concurrent"]["extra"]["actor_call_p99_ms"]),
        "<=",
        _const(5.0),
        " ms",
    ),
    Target(
        "index top_k p99 in-process",
        ("index_topk",),
        lambda c: _metric(c, "index_topk", "p99_ms"),
        "<=",
        _const(1.0),
        " ms",
    ),
    Target(
        "index restart from the parquet snapshot",
        ("index_restart",),
        lambda c: _metric(c, "index_restart", "seconds"),
        "<=",
        _const(1.0),
        " s",
    ),
    Target(
        "S3 loopback upload vs s3fs put",
        ("s3_store_save", "s3fs_put"),
        _ratio("s3_store_save", "s3fs_put"),
        ">=",
        _const(0.8),
    ),
    Target(
        "S3 loopback download vs s3fs get (no target set; >= 0.8x assumed)",
        ("s3_store_load", "s3fs_get"),
        _ratio("s3_store_load", "s3fs_get"),
        ">=",
        _const(0.8),
    ),
]


def evaluate_targets(cases: Cases) -> list[dict[str, Any]]:
    """Every target row evaluated on ``cases``."""
    return [t.evaluate(cases) for t in TARGETS]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{value:.2g}"


def _limit_for(name: str, group: str) -> str | None:
    """The device-limit case (O_DIRECT write or read) a throughput case is compared with."""
    if group in ("save", "ray") and name.endswith("_save"):
        return "direct_write"
    if group == "save":
        return "direct_write"
    if group.startswith("load_"):
        return f"direct_read_{group.removeprefix('load_')}"
    return None


def throughput_table(cases: Cases) -> str:
    """Markdown: every throughput case with seconds, GB/s and the ratio to the device limit (O_DIRECT)."""
    lines = [
        "| case | what | best s | median s | GB/s | x device limit (O_DIRECT) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, case in cases.items():
        metrics = case["metrics"]
        if "gbps" not in metrics:
            continue
        limit = _limit_for(name, case["group"])
        ratio = metrics["gbps"] / cases[limit]["metrics"]["gbps"] if limit and limit in cases else None
        lines.append(
            f"| {name} | {case['description']} | {_fmt(metrics['seconds'])} | {_fmt(metrics.get('median_seconds'))} "
            f"| {_fmt(metrics['gbps'])} | {_fmt(ratio) if ratio is not None else '-'} |"
        )
    return "\n".join(lines)


def other_table(cases: Cases) -> str:
    """Markdown: the cases measured in other units (latencies, memory, blocked time)."""
    lines = ["| case | what | figures |", "|---|---|---|"]
    for name, case in cases.items():
        metrics = case["metrics"]
        if "gbps" in metrics:
            continue
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        lines.append(f"| {name} | {case['description']} | {figures} |")
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each target figure, the measured value, the target and pass/short."""
    lines = ["| figure | measured | target | status |", "|---|---:|---:|---|"]
    for row in rows:
        unit = row.get("unit", "x")
        measured = "-" if row["value"] is None else f"{_fmt(row['value'])}{unit if unit != 'x' else 'x'}"
        lines.append(f"| {row['figure']} | {measured} | {row['target']} | {row['status']} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: header line with size and load, the targets, then the case tables and notes."""
    meta = result["meta"]
    load = meta["load_average"]
    head = (
        f"**{meta['size_human']} state dict, {meta['tensors']} fp32 tensors; {meta['nproc']} cores; "
        f"load average at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f} "
        f"(1-min); best of {meta['repeat']} runs; disk: {meta['filesystem']}**"
    )
    parts = [
        head,
        "",
        targets_table(result["targets"]),
        "",
        throughput_table(result["cases"]),
        "",
        other_table(result["cases"]),
    ]
    if result.get("notes"):
        parts += ["", *[f"- {k}: {v}" for k, v in result["notes"].items()]]
    return "\n".join(parts)
