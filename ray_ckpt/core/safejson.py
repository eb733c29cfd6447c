"""The one reader of JSON read from storage: every marker, index, sidecar, lease and header.

Files on storage are untrusted input. :func:`parse_json` bounds size and nesting depth, and
:class:`JsonObject` checks each field's type and range as it is read, so a damaged or hostile
file raises :class:`CorruptCheckpointError` naming the file and the field, never a bare
``TypeError``/``OverflowError``/``RecursionError`` from deep inside a reader.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

from ray_ckpt.core.errors import CorruptCheckpointError, StorageError

MAX_DEPTH = 64  # deeper than any file ray-ckpt or Hugging Face writes; a recursion bomb stops here
MAX_JSON_BYTES = 256 * 1024 * 1024  # an HF index of a huge model is a few MB; safetensors caps headers at 100 MiB
MAX_STEP = 2**63 - 1  # steps are int64 in the Parquet index and in every tool that reads it

_MISSING: Any = object()

# What a reader treats as damage to skip (one warning naming the file), never as the end of the
# run: a file that does not parse or validate, and one that cannot be read at all (a FIFO, a
# device or a directory where a file should be, a file over its size limit, a read that fails).
DAMAGE: tuple[type[Exception], ...] = (CorruptCheckpointError, StorageError)


def corrupt(name: str, message: str) -> CorruptCheckpointError:
    """A CorruptCheckpointError whose message starts with the file's name."""
    return CorruptCheckpointError(f"{name}: {message}", path=name)


def parse_json(data: bytes | str, *, name: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text from storage; CorruptCheckpointError naming ``name`` if it is not sane JSON.

    Bare ``NaN``/``Infinity`` are accepted (kept: versions before 7d0db75, 2026-11-23, wrote
    non-finite metrics that way); the value is then checked field by field through :class:`JsonObject`.
    """
    if len(data) > MAX_JSON_BYTES:
        raise corrupt(name, f"{len(data)} bytes of JSON is over the {MAX_JSON_BYTES}-byte limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise corrupt(name, f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise corrupt(name, f"not valid JSON: {exc}") from None
    if _depth_exceeds(value, max_depth):
        raise corrupt(name, f"JSON nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion to blow)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):  # a tuple about to be written is a JSON array
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def check_depth(doc: Mapping[str, Any], *, name: str) -> None:
    """ValueError naming the file and field when an object about to be written as JSON nests
    deeper than :data:`MAX_DEPTH`, the limit :func:`parse_json` applies when it is read back.

    The writer refuses what its own reader would refuse (one limit, shared): a state, trainer
    state or metadata nested that deep would commit and then never load.
    """
    for key, value in doc.items():
        if _depth_exceeds(value, MAX_DEPTH - 1):  # the file's own object is the first level
            raise ValueError(
                f"{name}: {key} nests deeper than the {MAX_DEPTH}-level limit its readers apply; flatten it"
            )


def type_name(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class JsonObject:
    """A parsed JSON object from a named file, read field by field with type and range checks.

    ``JsonObject.parse(data, name="checkpoints/step_000000010/checkpoint.json").int("step", lo=0)``
    """

    def __init__(self, raw: Any, *, name: str, where: str = "") -> None:
        if not isinstance(raw, dict):
            raise corrupt(name, f"{where or 'top level'}: expected an object, got {type_name(raw)}")
        self.raw: dict[str, Any] = raw
        self.name = name
        self.where = where

    @classmethod
    def parse(cls, data: bytes | str, *, name: str) -> JsonObject:
        """Parse a file that must hold one JSON object."""
        return cls(parse_json(data, name=name), name=name)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def keys(self) -> Iterator[str]:
        return iter(self.raw)

    def _field(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> CorruptCheckpointError:
        """A CorruptCheckpointError naming the file and this field."""
        return corrupt(self.name, f"{self._field(key)}: {message}")

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise self.error(key, "missing")
            return default
        return value

    def _wrong(self, key: str, expected: str, value: Any) -> CorruptCheckpointError:
        return self.error(key, f"expected {expected}, got {type_name(value)} {_short(value)}")

    def int(self, key: str, default: Any = _MISSING, *, lo: int | None = None, hi: int | None = None) -> int:
        """An integer field (a bool is not one; ``3.0`` is accepted as 3) within ``[lo, hi]``."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{_short(value)} is outside [{lo}, {hi}]")
        return value

    def float(self, key: str, default: Any = _MISSING, *, finite: bool = True) -> float:
        """A number field; with ``finite`` NaN and infinities are refused."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(key, "a number", value)
        try:
            out = float(value)
        except OverflowError:
            raise self.error(key, f"{_short(value)} does not fit a float") from None
        if finite and not math.isfinite(out):
            raise self.error(key, f"{out} is not a finite number")
        return out

    def str(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def list(self, key: str, default: Any = _MISSING) -> list[Any]:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self._wrong(key, "an array", value)
        return value

    def dict(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        """An object field as a plain dict (its values unchecked: see :meth:`obj`)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, dict):
            raise self._wrong(key, "an object", value)
        return value

    def obj(self, key: str, default: Any = _MISSING) -> JsonObject:
        """An object field, read on with the same checks (errors name ``outer.inner``)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            value = {} if value is None else value
        if not isinstance(value, dict):
            raise self._wrong(key, "an object", value)
        return JsonObject(value, name=self.name, where=self._field(key))

    def any(self, key: str, default: Any = None) -> Any:
        """A field of any JSON type (the caller checks it)."""
        return self.raw.get(key, default)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.raw.items())

    def objects(self) -> Iterator[tuple[str, JsonObject]]:
        """Each value of this object as a checked object."""
        for key, value in self.raw.items():
            if not isinstance(value, dict):
                raise self._wrong(key, "an object", value)
            yield key, JsonObject(value, name=self.name, where=self._field(key))


class DamageLog:
    """Warns once per damaged file that a reader skips, so the rest of a run goes on.

    Readers list, rank and load around a damaged marker, sidecar or lease; repeating the warning
    on every query would bury the one line that names the file.
    """

    def __init__(self, logger: logging.Logger, run_name: str) -> None:
        self.logger = logger
        self.run_name = run_name
        self._seen: set[str] = set()

    def skip(self, exc: Exception, what: str) -> None:
        """Log ``exc`` (one of ``DAMAGE``, which name the file) and what is skipped, the first time
        for each file."""
        key = getattr(exc, "path", None) or str(exc)
        if key not in self._seen:
            self._seen.add(key)
            self.logger.warning("run %s: %s; %s", self.run_name, exc, what)
