"""One-shot functions in the style of vibe-rl / Orbax: save or load a state with one call.

``directory`` is a run directory (``<storage>/<run_name>``, a local path or a URI): the same
layout, commit protocol and index as :class:`~ray_ckpt.core.store.CheckpointStore`
(``<directory>/checkpoints/step_N/``), so the CLI and every other reader see these checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ray_ckpt.adapters.state import plain_state
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.interop.artifact import open_run

METADATA_KEY = "user_metadata"


def open_directory(
    directory: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, **options: Any
) -> CheckpointStore:
    """The store of a run directory given as a path or URI (``<storage>/<run_name>``), through
    :func:`~ray_ckpt.interop.artifact.open_run` (it ranks and retains as the run's writer recorded)."""
    return open_run(directory, storage_options, must_exist=False, run_only=True, **options)


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: Mapping[str, Any],
    step: int | None = None,
    metadata: Any = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Save a (nested) state at ``step`` (default: one past the latest, 0 for the first); returns its record.

    ``metadata`` is any JSON value, read back by :func:`load_metadata`.
    """
    store = open_directory(directory, storage_options)
    if step is None:
        latest = store.latest()
        step = 0 if latest is None else latest.step + 1
    extra = None if metadata is None else {METADATA_KEY: metadata}
    return store.save(step, plain_state(state), metrics=metrics, metadata=extra, overwrite=overwrite)


def load_checkpoint(
    directory: str | os.PathLike[str],
    like: Any = None,
    step: int | str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load the state saved at ``step`` (default: the latest).

    With ``like`` (a template state), the loaded state must have the same keys, and every
    tensor the template's shape and dtype; a mismatch raises naming the key. Leaves come back
    in the template's types (numpy arrays stay numpy, tensors stay torch).
    """
    store = open_directory(directory, storage_options)
    loaded = store.load("latest" if step is None else step)
    if like is None:
        return loaded
    return _conform(loaded, like, "")


def load_metadata(
    directory: str | os.PathLike[str], step: int | str | None = None, *, storage_options: dict[str, Any] | None = None
) -> Any:
    """The metadata saved with a checkpoint; None when there is no checkpoint or it had none."""
    store = open_directory(directory, storage_options)
    if step is None:
        latest = store.latest()
        if latest is None:
            return None
        return latest.metadata.get(METADATA_KEY)
    return store.info(step).metadata.get(METADATA_KEY)


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__}{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _as_torch_dtype(value: torch.Tensor | np.ndarray) -> torch.dtype:
    if isinstance(value, torch.Tensor):
        return value.dtype
    return torch.from_numpy(np.empty((0,), dtype=value.dtype)).dtype


def _conform(loaded: Any, like: Any, path: str) -> Any:
    where = path or "<root>"
    if isinstance(like, (torch.nn.Module, torch.optim.Optimizer)):
        like = plain_state(like)
    if isinstance(like, Mapping):
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{where}: template has a mapping, checkpoint has {_describe(loaded)}")
        missing = [k for k in like if k not in loaded]
        extra = [k for k in loaded if k not in like]
        if missing or extra:
            raise KeyError(
                f"{where}: keys differ from the template: missing from the checkpoint {missing[:5]}, "
                f"not in the template {extra[:5]}"
            )
        out = {k: _conform(loaded[k], v, f"{path}.{k}" if path else str(k)) for k, v in like.items()}
        if type(like) is not dict:
            try:
                return type(like)(out)  # e.g. an OrderedDict template
            except TypeError:
                pass
        return out
    if isinstance(like, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(like):
            raise ValueError(
                f"{where}: template has a {type(like).__name__} of {len(like)}, checkpoint has "
                f"{_describe(loaded)}{f' of {len(loaded)}' if isinstance(loaded, (list, tuple)) else ''}"
            )
        pairs = enumerate(zip(loaded, like, strict=True))
        items = [_conform(a, b, f"{path}.{i}" if path else str(i)) for i, (a, b) in pairs]
        return type(like)(items) if type(like) in (list, tuple) else items
    if isinstance(like, (torch.Tensor, np.ndarray)):
        if not isinstance(loaded, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{where}: template has {_describe(like)}, checkpoint has {_describe(loaded)}")
        if tuple(loaded.shape) != tuple(like.shape):
            raise ValueError(
                f"{where}: shape {tuple(loaded.shape)} in the checkpoint, {tuple(like.shape)} in the template"
            )
        if _as_torch_dtype(loaded) != _as_torch_dtype(like):
            raise ValueError(f"{where}: dtype {loaded.dtype} in the checkpoint, {like.dtype} in the template")
        if isinstance(like, np.ndarray):
            return loaded.numpy() if isinstance(loaded, torch.Tensor) else loaded
        tensor = torch.from_numpy(loaded) if isinstance(loaded, np.ndarray) else loaded
        return tensor.to(like.device)
    return loaded
