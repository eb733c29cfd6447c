"""The layout of a run on storage (a contract): names, step directories, the commit marker.

Every path a run uses is built here, and every marker is parsed here, through the validating
reader. Nothing here performs I/O::

    <run>/model_architecture.json
    <run>/checkpoints/step_<step:09d>/{model*.safetensors, model.safetensors.index.json, config.json,
                                       trainer_state/{trainer_state*.safetensors, trainer_state.json},
                                       eval_metrics.json, checkpoint.json}   # the marker, written LAST
    <run>/checkpoints/step_<step:09d>/.retiring          # while retention deletes the step
    <run>/checkpoints/.step_<step:09d>.replace-<id>/      # a replacement (overwrite=True) being written
    <run>/index.parquet + <run>/index_log/<seq>.json      # the run index: snapshot + changes since
    <run>/leases/step_<step:09d>.<lease_id>.json
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ray_ckpt.core.format.digests import FileDigest
from ray_ckpt.core.format.tree import check_structure
from ray_ckpt.core.safejson import MAX_STEP, JsonObject, parse_json

CHECKPOINTS_DIR = "checkpoints"
LEASES_DIR = "leases"
MARKER_FILE = "checkpoint.json"
EVAL_FILE = "eval_metrics.json"
RETIRING_FILE = ".retiring"  # retention's tombstone: the step is being deleted, no new leases
INDEX_SNAPSHOT = "index.parquet"
INDEX_LOG_DIR = "index_log"
TRAINER_STATE_DIR = "trainer_state"  # out of the model files' way: a *.safetensors glob sees weights only
TRAINER_STATE_JSON = f"{TRAINER_STATE_DIR}/trainer_state.json"  # structure, aliases, weight map (and chunks)
# Before the trainer_state/ directory: the trainer state as these two files beside the model,
# written by every version from the first commit (8df6c1e, 2026-11-23) until the trainer_state/
# directory (1703474, 2026-12-01). Kept: runs saved with those versions resume from them.
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
# 2: tensor files carry block digests (20e4da1, 2026-12-07). Version 1 steps (whole-file checksums)
# were written by every version before it; kept: they load and verify with those checksums.
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d{9,})$")
_SELECTOR_RE = re.compile(r"^(?:(latest|best)|(?:v|step_)(\d+)|(\d+))$")
REPLACE_RE = re.compile(r"^\.step_(\d{9,})\.(replace|old)-([0-9a-f]{12})$")  # see staging_dir
MAX_WORLD_SIZE = 2**31 - 1
MANIFEST_KINDS = frozenset({"state_dict", "files"})
_MANIFEST_FIELDS = frozenset(
    ("format_version", "step", "created", "kind", "metrics", "world_size")
    + ("metadata", "model", "trainer_state", "files")
)

Selector = int | str


def step_dir(step: int) -> str:
    """Root-relative directory of a step."""
    return f"{CHECKPOINTS_DIR}/step_{step:09d}"


def staging_dir(step: int, replace_id: str) -> str:
    """Where a save that replaces committed ``step`` (overwrite=True) writes until it is swapped in."""
    return f"{CHECKPOINTS_DIR}/.step_{step:09d}.replace-{replace_id}"


def retired_dir(step: int, replace_id: str) -> str:
    """Where the old version of a replaced step waits for deletion when no atomic swap exists."""
    return f"{CHECKPOINTS_DIR}/.step_{step:09d}.old-{replace_id}"


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step_<n>`` directory name; None for any other name or a step out of range."""
    match = _STEP_RE.match(name)
    if not match:
        return None
    step = int(match.group(1))
    return step if step <= MAX_STEP else None


def parse_selector(text: str, *, bare_number: bool = True) -> str | int | None:
    """A step selector's meaning: ``"latest"``/``"best"`` as they are, ``"vN"``/``"step_N"`` (and,
    with ``bare_number``, ``"N"``) as the int N; None for any other text.

    The one parser of selectors: :meth:`CheckpointStore.resolve` (``bare_number``) and run URIs
    (``<run>:vN``, where a bare ``:N`` is refused) both use it.
    """
    match = _SELECTOR_RE.match(text) if isinstance(text, str) else None
    if match is None or (match.group(3) is not None and not bare_number):
        return None
    if match.group(1) is not None:
        return match.group(1)
    return int(match.group(2) or match.group(3))


def validate_step(step: Any) -> int:
    """A step as an int: non-negative and below 2**63; ValueError naming ``step`` otherwise."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: must be a non-negative integer, got {step!r}")
    if step > MAX_STEP:
        raise ValueError(f"step: must be below 2**63 (steps are int64 in the run index), got {step!r}")
    return int(step)


def validate_metrics(metrics: Mapping[str, Any] | None, *, what: str = "metrics") -> dict[str, float]:
    """Metrics as plain floats: numpy/torch scalars converted; a value that is no number, or does
    not fit a float (``10**400``), is refused naming the metric."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: metric names must be strings, got {key!r}")
        try:
            key.encode("utf-8")  # the index stores names as UTF-8: a lone surrogate could never be written
        except UnicodeEncodeError:
            raise ValueError(f"{what}: metric name {key!r} is not valid Unicode (a lone surrogate)") from None
        if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what}: {key!r} must be a number, got {type(value).__name__} {value!r}")
        try:
            out[key] = float(value)
        except OverflowError:
            raise ValueError(f"{what}: {key!r} = {value} does not fit a float (64-bit)") from None
    return out


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def metrics_to_json(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Metrics as strict JSON: NaN/inf become the strings "NaN"/"Infinity"/"-Infinity"."""
    return {
        k: v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
        for k, v in metrics.items()
    }


def metrics_from_json(raw: Any, *, name: str, where: str = "metrics") -> dict[str, float]:
    """Inverse of :func:`metrics_to_json`; also reads bare NaN/Infinity (kept: every version before
    7d0db75 (2026-11-23) wrote non-finite metrics that way into checkpoint.json and eval_metrics.json).

    CorruptCheckpointError naming the file and the metric for anything but names -> numbers.
    """
    doc = JsonObject(raw, name=name, where=where)
    out: dict[str, float] = {}
    for key, value in doc.items():
        if isinstance(value, str) and value in _NON_FINITE:
            out[key] = _NON_FINITE[value]
        else:
            out[key] = doc.float(key, finite=False)
    return out


def read_metrics_file(data: bytes, *, name: str) -> dict[str, float]:
    """A metrics sidecar (``eval_metrics.json``): one JSON object of names -> numbers."""
    return metrics_from_json(parse_json(data, name=name), name=name, where="")


def _file_name(name: Any) -> str:
    """A file name from a marker: relative, inside the step directory, portable."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ValueError(f"{name!r} is not a relative path inside the step directory")
    return name


@dataclass
class Manifest:
    """The parsed commit marker of a step."""

    step: int
    created: float
    metrics: dict[str, float]
    world_size: int
    metadata: dict[str, Any]
    files: dict[str, FileDigest]
    model: dict[str, Any]
    trainer_state: bool
    kind: str = "state_dict"  # or "files" for bring-your-own-files checkpoints
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_bytes(self) -> bytes:
        data = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "created": self.created,
            "kind": self.kind,
            "metrics": metrics_to_json(self.metrics),
            "world_size": self.world_size,
            "metadata": self.metadata,
            "model": self.model,
            "trainer_state": self.trainer_state,
            "files": {name: d.to_json() for name, d in sorted(self.files.items())},
            **self.extra,
        }
        return json.dumps(data, indent=2, default=str).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, name: str) -> Manifest:
        """Parse and check a marker: every field's type and range, every file name inside the step.

        Raises CorruptCheckpointError naming the file and the field; nothing else.
        """
        doc = JsonObject.parse(data, name=name)
        version = doc.int("format_version", 0, lo=0)
        if version > FORMAT_VERSION:
            raise doc.error("format_version", f"{version} is newer than this ray-ckpt understands")
        files: dict[str, FileDigest] = {}
        for fname, entry in doc.obj("files").objects():
            try:
                _file_name(fname)
            except ValueError as exc:
                raise doc.error("files", str(exc)) from None
            files[fname] = FileDigest.parse(entry)
        kind = doc.str("kind", "state_dict")
        if kind not in MANIFEST_KINDS:
            raise doc.error("kind", f"{kind!r} is not one of {sorted(MANIFEST_KINDS)}")
        return cls(
            step=doc.int("step", lo=0, hi=MAX_STEP),
            created=doc.float("created"),
            metrics=metrics_from_json(doc.any("metrics") or {}, name=name),
            world_size=doc.int("world_size", 1, lo=1, hi=MAX_WORLD_SIZE),
            metadata=doc.dict("metadata", {}),
            files=files,
            model=_model_record(doc.obj("model", {}), files) if kind == "state_dict" else doc.dict("model", {}),
            trainer_state=doc.bool("trainer_state", False),
            kind=kind,
            extra={k: v for k, v in doc.items() if k not in _MANIFEST_FIELDS},
        )


def _model_record(model: JsonObject, files: Mapping[str, FileDigest]) -> dict[str, Any]:
    """The marker's ``model`` section, checked: its index a listed file, sizes and aliases typed."""
    out = dict(model.raw)
    if model.any("index") is not None:
        index = model.str("index")
        if index not in files:
            raise model.error("index", f"{index!r} is not a file listed in the marker")
        out["index"] = index
    fmt = model.str("format", "safetensors")
    if fmt not in ("safetensors", "pt"):
        raise model.error("format", f"{fmt!r} is not 'safetensors' or 'pt'")
    out["format"] = fmt
    out["total_size"] = model.int("total_size", 0, lo=0, hi=MAX_STEP)
    aliases = model.dict("aliases", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise model.error("aliases", "expected an object of tensor names -> tensor names")
    out["aliases"] = aliases
    try:
        check_structure(model.any("structure"))
    except ValueError as exc:
        raise model.error("structure", str(exc)) from None
    return out


Selector = int | str
