"""Addressing: run-name validation and storage-URI normalisation."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ray_ckpt.core.errors import ConfigError
from ray_ckpt.core.layout import parse_selector, parse_step_dir

MAX_RUN_NAME_LENGTH = 200
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-+=@,]*$")


def validate_run_name(name: str, *, field_name: str = "run_name") -> str:
    """Return ``name`` if it is a safe single path component, else raise ConfigError naming it.

    Refuses empty or overlong names, path separators, ``..``, NUL, ``:`` (the URI selector
    separator) and anything that is not a plain portable file name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{field_name}: expected str, got {type(name).__name__}")
    if not name:
        raise ConfigError(f"{field_name}: must not be empty")
    if len(name) > MAX_RUN_NAME_LENGTH:
        raise ConfigError(f"{field_name}: longer than {MAX_RUN_NAME_LENGTH} characters ({len(name)})")
    if "\x00" in name:
        raise ConfigError(f"{field_name}: contains a NUL byte: {name!r}")
    if ".." in name:
        raise ConfigError(f"{field_name}: must not contain '..': {name!r}")
    if "/" in name or "\\" in name or os.path.isabs(name):
        raise ConfigError(f"{field_name}: must be a single path component, got {name!r}")
    if not _RUN_NAME_RE.match(name):
        raise ConfigError(
            f"{field_name}: {name!r} may only use letters, digits and . _ - + = @ , "
            "and must start with a letter or digit"
        )
    return name


def normalize_storage_uri(uri: str) -> str:
    """Turn a bare path into an absolute ``file://`` URI; leave URIs with a scheme as they are."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"storage_uri: expected a non-empty string, got {uri!r}")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme == "file":
            return "file://" + os.path.abspath(os.path.expanduser(rest or "/"))
        return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else uri
    return "file://" + os.path.abspath(os.path.expanduser(uri))


# ---------------------------------------------------------------------------------------------
# Checkpoint URIs: <storage_uri>/<run_name>[:selector], step directories, legacy files, mock://.
# ---------------------------------------------------------------------------------------------
MOCK_SCHEME = "mock"
LEGACY_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # a Hugging Face weights index
_METTA_FILE_RE = re.compile(r"^(?P<run>.+):v(?P<version>\d+)\.(?:pt|pth|mpt)$")


@dataclass(frozen=True)
class ParsedURI:
    """A checkpoint URI taken apart.

    ``kind`` is ``"run"`` (a run directory, optionally with a selector, or any other directory
    such as a Hugging Face model folder), ``"step"`` (a step directory
    ``.../<run>/checkpoints/step_N``), ``"file"`` (a single legacy checkpoint file, or a Hugging
    Face ``*.safetensors.index.json`` naming a sharded folder) or ``"mock"``. ``selector`` is
    ``"latest"``, ``"best"``, a step number, or None when absent.
    """

    kind: str
    scheme: str
    location: str  # normalised URI of the run dir / step dir / file, without the selector
    storage_uri: str  # parent of the run directory (or of the file)
    run_name: str
    selector: str | int | None = None

    @property
    def step(self) -> int | None:
        """The step the URI names explicitly (a ``:vN``/``:step_N`` selector, a step dir)."""
        return self.selector if isinstance(self.selector, int) else None

    @property
    def run_uri(self) -> str:
        """The run directory URI (``<storage_uri>/<run_name>``)."""
        if self.kind == "mock":
            return f"{MOCK_SCHEME}://{self.run_name}"
        return f"{self.storage_uri}/{self.run_name}"


def _selector_text(selector: str | int | None) -> str:
    if selector is None:
        return ""
    return f":v{selector}" if isinstance(selector, int) else f":{selector}"


def _parse_selector(text: str, uri: str) -> str | int:
    selector = parse_selector(text, bare_number=False)
    if selector is None:
        raise ConfigError(f"{uri!r}: bad selector {text!r} (expected :latest, :best, :vN or :step_N)")
    return selector


def is_legacy_file_name(name: str) -> bool:
    """Whether a file name has a legacy checkpoint extension (.pt, .pth, .bin, .ckpt, .safetensors)."""
    return name.lower().endswith(LEGACY_EXTENSIONS)


def is_hf_index_name(name: str) -> bool:
    """Whether a file name is a Hugging Face weights index (``*.safetensors.index.json``, ``*.bin.index.json``)."""
    return name.endswith(HF_INDEX_SUFFIXES)


def is_checkpoint_file_name(name: str) -> bool:
    """Whether a URI's last component names a checkpoint file: a legacy file or an HF index."""
    return is_legacy_file_name(name) or is_hf_index_name(name)


def parse_metta_file_name(name: str) -> tuple[str, int] | None:
    """``run_name:vN.pt`` -> ``(run_name, N)``; None for any other name."""
    match = _METTA_FILE_RE.match(name)
    return (match.group("run"), int(match.group("version"))) if match else None


def parse_uri(uri: str) -> ParsedURI:
    """Take a checkpoint URI apart; ConfigError naming the URI when it is malformed.

    Only a ``:`` in the last path component is a selector (``s3://`` has one in its scheme);
    a legacy file name such as ``run1:v3.pt`` is a file, not a selector.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"checkpoint URI: expected a non-empty string, got {uri!r}")
    uri = uri.strip()
    if uri.startswith(f"{MOCK_SCHEME}://"):
        rest = uri[len(MOCK_SCHEME) + 3 :].strip("/")
        name, sep, sel = rest.rpartition(":") if ":" in rest else (rest, "", "")
        selector = _parse_selector(sel, uri) if sep else None
        validate_run_name(name, field_name=f"{uri!r}: mock model name")
        return ParsedURI("mock", MOCK_SCHEME, f"{MOCK_SCHEME}://{name}", f"{MOCK_SCHEME}://", name, selector)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if "://" in uri and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        raise ConfigError(f"{uri!r}: malformed URI scheme {scheme!r}")
    body = uri.split("://", 1)[1] if "://" in uri else uri
    head, _, last = body.rstrip("/").rpartition("/")
    if not last:
        raise ConfigError(f"{uri!r}: no run name (expected <storage>/<run_name>[:selector])")
    selector: str | int | None = None
    if ":" in last and not is_checkpoint_file_name(last):
        last, _, sel = last.rpartition(":")
        selector = _parse_selector(sel, uri)
    prefix = f"{scheme}://" if "://" in uri else ""
    if prefix and scheme != "file" and not head.strip("/"):
        raise ConfigError(f"{uri!r}: no run name (expected {scheme}://<bucket>/[<prefix>/]<run_name>[:selector])")
    location = normalize_storage_uri(f"{prefix}{head}/{last}" if head or prefix else last)
    parent, _, name = location.rpartition("/")
    if is_checkpoint_file_name(name):
        metta = parse_metta_file_name(name)
        if selector is not None:
            raise ConfigError(f"{uri!r}: a selector applies to a run, not to the file {name!r}")
        if is_hf_index_name(name):  # the index names its folder's checkpoint
            run_name = parent.rpartition("/")[2] or name.split(".", 1)[0]
        else:
            run_name = metta[0] if metta else name.rsplit(".", 1)[0]
        return ParsedURI("file", scheme, location, parent, run_name, metta[1] if metta else None)
    step = parse_step_dir(name)
    grand, _, checkpoints = parent.rpartition("/")
    if step is not None and checkpoints == "checkpoints":
        if selector is not None:
            raise ConfigError(f"{uri!r}: a step directory takes no selector")
        storage_uri, _, run_name = grand.rpartition("/")
        validate_run_name(run_name, field_name=f"{uri!r}: run name")
        return ParsedURI("step", scheme, location, storage_uri, run_name, step)
    if parent.endswith(":/") or parent.endswith(":"):
        raise ConfigError(f"{uri!r}: no run name (expected <storage>/<run_name>[:selector])")
    validate_run_name(name, field_name=f"{uri!r}: run name")
    return ParsedURI("run", scheme, location, parent, name, selector)


def normalize_uri(uri: str) -> str:
    """The canonical form of a checkpoint URI: absolute ``file://`` paths, ``:vN`` step selectors.

    Two URIs that name the same checkpoint normalise to the same string.
    """
    parsed = parse_uri(uri)
    if parsed.kind == "step":
        return parsed.location
    if parsed.kind == "file":
        return parsed.location
    return parsed.location + _selector_text(parsed.selector)


def key_and_version(uri: str) -> tuple[str, int | None]:
    """``(run_name, step)`` of a URI; step is None when it is not explicit (``:latest``, ``:best``, none)."""
    parsed = parse_uri(uri)
    return parsed.run_name, parsed.step
