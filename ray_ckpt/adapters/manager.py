"""An in-process checkpoint manager with Orbax ``CheckpointManager`` semantics, for training loops
that do not use Ray actors; and ``initialize_run_dir`` for resume / overwrite / new runs.

A thin layer over :class:`~ray_ckpt.core.store.CheckpointStore`: the same format, commit protocol,
retention (``max_to_keep`` becomes ``keep_last_n``, or ``keep_top_k`` when ranking by
``best_fn``) and index. Nothing here writes a file itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ray_ckpt.adapters.state import plain_state
from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.core.uri import ParsedURI, normalize_storage_uri, parse_uri
from ray_ckpt.interop.artifact import POLICY_KEY, open_run

logger = logging.getLogger(__name__)

BEST_FN_METRIC = "_best_fn"
MANAGER_KEY = "ray_ckpt.adapters.manager"
_TRASH_MARKER = ".trash-"


def _run_uri(directory_or_uri: str) -> ParsedURI:
    parsed = parse_uri(directory_or_uri)
    if parsed.kind != "run" or parsed.selector is not None:
        raise ConfigError(f"{directory_or_uri!r}: expected a run directory (<storage>/<run_name>), without a selector")
    return parsed


def _split_state(state: Any) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
    """``(model state, trainer state, layout)``: a ``"model"`` entry becomes the model weights.

    Modules and optimizers are replaced by their state dicts. Without a ``"model"`` entry the
    whole state is stored as the model state (nested states are fine).
    """
    if isinstance(state, torch.nn.Module):
        return plain_state(state), None, {"layout": "module"}
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping or an nn.Module, got {type(state).__name__}")
    converted = plain_state(state)
    model = converted.get("model")
    if isinstance(model, Mapping) and model:
        rest = {k: v for k, v in converted.items() if k != "model"}
        return model, rest or None, {"layout": "split", "keys": [str(k) for k in converted]}
    return converted, None, {"layout": "whole"}


def _join_state(model_state: Any, trainer_state: Any, layout: Mapping[str, Any]) -> Any:
    if layout.get("layout") != "split":
        return model_state
    parts = {"model": model_state, **(trainer_state or {})}
    order = [k for k in layout.get("keys", []) if k in parts]
    return {k: parts[k] for k in order + [k for k in parts if k not in order]}


# The config fields CheckpointManager sets from its own arguments, and from which argument.
_ARGUMENT_OF = {
    "storage_uri": "directory_or_uri",
    "run_name": "directory_or_uri",
    "storage_options": "storage_options",
    "metric_name": "best_fn",
    "mode": "best_mode",
    "keep_top_k": "max_to_keep",
    "keep_last_n": "max_to_keep",
    "keep_period": "keep_period",
    "save_interval_steps": "save_interval_steps",
    "async_save": "async_save",
}


def _replaced_by_arguments(config: CheckpointConfig, changes: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """``{field: (the value the manager uses, its argument)}`` for ``check_consumed(replaced=...)``."""
    replaced = {name: (value, _ARGUMENT_OF[name]) for name, value in changes.items()}
    if normalize_storage_uri(config.storage_uri) == changes["storage_uri"]:
        replaced.pop("storage_uri")  # the same location, spelled differently
    return replaced


# What CheckpointManager reads of a config (check_consumed(by='CheckpointManager')).
register_consumer("CheckpointManager", {"store", "retention", "save_interval_steps", "async_save"})


class CheckpointManager:
    """Save every ``save_interval_steps`` steps, keep ``max_to_keep``, restore latest or any step.

    ``best_fn`` maps a save's metrics to the number that ranks checkpoints (``best_mode`` says
    whether lower or higher is better); a string names a metric directly. With ``async_save``
    saves run on a background thread (the state is snapshotted first); errors surface at the
    next ``save``, ``wait`` or ``close``. Use as a context manager.

    ``config`` supplies the other options (shard size, format, storage options, ...); a field it
    sets that the manager ignores (the checkpointer's, tiering) or takes from its own arguments
    (``max_to_keep``, ``best_fn``, ...) with another value is a ConfigError naming the field.
    """

    def __init__(
        self,
        directory_or_uri: str,
        max_to_keep: int | None = 5,
        keep_period: int | None = None,
        save_interval_steps: int = 1,
        best_fn: Callable[[Mapping[str, float]], float] | str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        *,
        storage_options: dict[str, Any] | None = None,
        config: CheckpointConfig | None = None,
    ) -> None:
        parsed = _run_uri(directory_or_uri)
        bad_keep = isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        if max_to_keep is not None and bad_keep:
            raise ConfigError(f"max_to_keep: must be a positive integer or None, got {max_to_keep!r}")
        self._best_fn = best_fn if callable(best_fn) else None
        if best_fn is not None and not callable(best_fn) and not isinstance(best_fn, str):
            raise ConfigError(f"best_fn: expected a callable or a metric name, got {best_fn!r}")
        metric_name = BEST_FN_METRIC if callable(best_fn) else best_fn
        ranked = metric_name is not None
        options: dict[str, Any] = {
            "metric_name": metric_name,
            "mode": best_mode,
            "keep_top_k": max_to_keep if ranked else None,
            "keep_last_n": None if ranked else max_to_keep,
            "keep_period": keep_period,
            "save_interval_steps": save_interval_steps,
            "async_save": async_save,
        }
        changes: dict[str, Any] = {"storage_uri": parsed.storage_uri, "run_name": parsed.run_name, **options}
        if storage_options is not None:
            changes["storage_options"] = storage_options
        if config is not None:  # a field this manager ignores, or replaces from an argument, is an error
            config.check_consumed("CheckpointManager", replaced=_replaced_by_arguments(config, changes))
        self.store = CheckpointStore(config=(config or CheckpointConfig()).replace(**changes))
        self.max_to_keep = max_to_keep
        self._policy = {
            "metric_name": metric_name,
            "mode": best_mode,
            "keep_top_k": options["keep_top_k"],
            "keep_last_n": options["keep_last_n"],
            "keep_period": keep_period,
        }
        self._pending: list[tuple[int, concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._closed = False
        latest = self.store.latest()
        self._last_step: int | None = latest.step if latest is not None else None

    def __repr__(self) -> str:
        return f"CheckpointManager({self.store.uri!r})"

    @property
    def directory(self) -> str:
        """The run directory URI."""
        return self.store.uri

    # -- saving -------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` would write: on the interval and after the last saved step."""
        if step % self.store.config.save_interval_steps != 0:
            return False
        return self._last_step is None or step > self._last_step

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Save ``state`` at ``step``; False (nothing written) when the step is off the save interval.

        ``state`` is a state dict, an nn.Module, or a mapping whose ``"model"`` entry holds the
        weights and whose other entries (optimizer, scheduler, counters) are the trainer state.
        A step at or before the last saved one raises CheckpointExistsError.
        """
        self._check_open()
        self._raise_failed()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be a non-negative integer, got {step!r}")
        if not force and step % self.store.config.save_interval_steps != 0:
            return False
        if self._last_step is not None and step <= self._last_step:
            raise CheckpointExistsError(
                f"step {step}: run {self.store.run_name!r} already has step {self._last_step}; steps must increase"
            )
        metrics = dict(metrics or {})
        if self._best_fn is not None:
            if metrics:
                metrics[BEST_FN_METRIC] = float(self._best_fn(metrics))
            else:
                logger.warning("step %d saved without metrics: best_fn cannot rank it", step)
        model_state, trainer_state, layout = _split_state(state)
        full_metadata = {**dict(metadata or {}), POLICY_KEY: self._policy, MANAGER_KEY: layout}
        try:
            json.dumps(full_metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata: not JSON serialisable: {exc}") from exc
        kwargs = {"metrics": metrics, "trainer_state": trainer_state, "metadata": full_metadata}
        if self.store.config.async_save:
            future = self.store.save_async(step, model_state, **kwargs)
            with self._lock:
                self._pending.append((step, future))
        else:
            self.store.save(step, model_state, **kwargs)
        self._last_step = step
        return True

    def _raise_failed(self) -> None:
        """Raise the error of a finished background save (once), dropping finished saves."""
        with self._lock:
            done = [(s, f) for s, f in self._pending if f.done()]
            self._pending = [(s, f) for s, f in self._pending if not f.done()]
        failed = [(step, future.exception()) for step, future in done if future.exception() is not None]
        for step, exc in failed:
            logger.error("background save of step %d failed: %s", step, exc)
            self._forget_failed(step)
        if failed:
            raise failed[0][1]  # type: ignore[misc]

    def _forget_failed(self, step: int) -> None:
        if self._last_step == step:
            latest = self.store.latest()
            self._last_step = latest.step if latest is not None else None

    def wait(self) -> None:
        """Block until every background save has committed; raise the first one's error."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for step, future in pending:
            exc = future.exception()
            if exc is not None:
                logger.error("background save of step %d failed: %s", step, exc)
                self._forget_failed(step)
                first = first or exc
        if first is not None:
            raise first

    # -- reading ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps plus saves still in flight, oldest first."""
        with self._lock:
            in_flight = {s for s, f in self._pending if not f.done()}
        return sorted({info.step for info in self.store.list()} | in_flight)

    def latest_step(self) -> int | None:
        """The newest step (saved or being saved), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by ``best_fn`` (waits for pending saves); None when not ranking."""
        if self.store.config.metric_name is None:
            return None
        self.wait()
        best = self.store.best()
        return best.step if best is not None else None

    def restore(self, step: int | None = None) -> Any:
        """The state saved at ``step`` (default: the latest), in the shape it was saved in."""
        self.wait()
        if step is None:
            latest = self.store.latest()
            if latest is None:
                raise CheckpointNotFoundError(f"run {self.store.run_name!r} at {self.store.uri} has no checkpoint")
            step = latest.step
        info = self.store.info(step)
        layout = info.metadata.get(MANAGER_KEY) or {}
        return _join_state(self.store.load(step), self.store.load_trainer_state(step), layout)

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics recorded with a committed step."""
        return dict(self.store.info(step).metrics)

    # -- lifecycle ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def close(self) -> None:
        """Wait for background saves, then release the writer thread (idempotent)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.store.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # do not hide the error that left the block
            logger.error("closing %r after an error also failed: %s", self, close_exc)


def initialize_run_dir(path: str, mode: str = "resume", *, storage_options: dict[str, Any] | None = None) -> int | None:
    """Prepare a run directory; returns the step to resume from (None for a fresh start).

    ``"new"``: FileExistsError when the run exists. ``"resume"``: the latest committed step, or
    a fresh start when there is nothing. ``"overwrite"``: the old run is first renamed to a
    hidden trash name (one atomic rename on a local disk, so it is never seen half-deleted),
    then deleted; on object stores every checkpoint's marker goes first, then the data.
    """
    if mode not in ("resume", "overwrite", "new"):
        raise ConfigError(f"mode: must be 'resume', 'overwrite' or 'new', got {mode!r}")
    parsed = _run_uri(path)
    store = open_run(parsed, storage_options, must_exist=False)
    parent = Storage(parsed.storage_uri, storage_options)
    _remove_trash(parent, parsed.run_name)
    exists = bool(store.storage.list_names(""))
    if mode == "new" and exists:
        raise CheckpointExistsError(
            f"run directory {store.uri} already exists (mode='new'); use mode='resume' or mode='overwrite'"
        )
    if mode == "resume" and exists:
        latest = store.latest()
        logger.info("resuming run %s from %s", store.uri, f"step {latest.step}" if latest else "scratch")
        return latest.step if latest is not None else None
    if mode == "overwrite" and exists:
        _discard_run(store, parent, parsed.run_name)
    store.storage.makedirs("")
    return None


def _discard_run(store: CheckpointStore, parent: Storage, run_name: str) -> None:
    leased = store.leased_steps()
    if leased:
        logger.warning("overwriting run %s although steps %s are leased by readers", store.uri, sorted(leased))
    if store.storage.is_local:
        trash = f".{run_name}{_TRASH_MARKER}{uuid.uuid4().hex[:12]}"
        os.rename(store.storage.full_path(), parent.full_path(trash))
        parent.fsync_dir("")
        logger.info("moved run %s aside to %s; deleting it", store.uri, parent.url(trash))
        parent.rm(trash, recursive=True, missing_ok=True)
        return
    for info in store.list():
        store.delete(info.step)
    store.storage.rm("", recursive=True, missing_ok=True)
    logger.info("deleted run %s", store.uri)


def _remove_trash(parent: Storage, run_name: str) -> None:
    """Finish deleting runs an earlier overwrite moved aside but did not get to delete."""
    if not parent.is_local:
        return
    prefix = f".{run_name}{_TRASH_MARKER}"
    for name in parent.list_names(""):
        if name.startswith(prefix):
            logger.info("removing %s left by an interrupted overwrite", parent.url(name))
            parent.rm(name, recursive=True, missing_ok=True)
