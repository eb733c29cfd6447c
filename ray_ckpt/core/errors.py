"""Exceptions raised by ray-ckpt; each names the step, file, key or field at fault."""

from __future__ import annotations


class RayCkptError(Exception):
    """Base class of every ray-ckpt error."""


class ConfigError(RayCkptError, ValueError):
    """An invalid configuration value; the message names the field."""


class CorruptCheckpointError(RayCkptError):
    """A committed checkpoint failed verification; the message names the file."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(RayCkptError, FileNotFoundError):
    """The requested run or step has no committed checkpoint."""


class CheckpointExistsError(RayCkptError, FileExistsError):
    """A save would replace or go back past a committed checkpoint without overwrite=True."""


class ArchitectureNotAllowedError(RayCkptError, PermissionError):
    """model_architecture.json names a class outside allowed_architecture_prefixes."""


class SaveAbortedError(RayCkptError):
    """A distributed save was aborted (a rank timed out, failed or disagreed).

    ``failures`` maps each rank whose write failed to its exception (empty when no rank failed,
    e.g. a timeout or inconsistent descriptions, which the message names).
    """

    def __init__(self, message: str = "", *, failures: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})


class StorageError(RayCkptError, OSError):
    """A storage operation failed after its retries; the message names the path."""
