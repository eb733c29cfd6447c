"""Addressing: run-name validation and storage-URI normalisation."""

from __future__ import annotations

import os
import re

from ray_ckpt.errors import ConfigError

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
