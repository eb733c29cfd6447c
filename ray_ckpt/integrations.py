"""Glue between ray-ckpt and Ray Train / Ray Tune checkpoints, with no second format.

A Train/Tune ``Checkpoint`` made here is a tiny *pointer* directory: one JSON file naming the
storage URI, run, step and step URI of a committed ray-ckpt checkpoint (plus any non-secret
storage options). Ray copies that directory into its own storage as usual, Tune's schedulers
(PBT exploit, trial restore) pass it around, and whoever resumes from it reads the weights
straight from ray-ckpt storage::

    info = client.save(step, model.state_dict(), metrics=m, blocking=True).result()
    ray_ckpt.integrations.report(m, info, config)            # ray.tune.report or ray.train.report

    checkpoint = ray.tune.get_checkpoint()                   # or ray.train.get_checkpoint()
    if checkpoint is not None:
        step, state, trainer_state = load_from_ray_checkpoint(checkpoint)

Starting a checkpointer *inside* a Tune trial: pass ``scheduling_strategy="DEFAULT"`` (Tune
captures child actors into the trial's placement group and kills them when it removes that group
on a trial stop or failure) and ``detached=True`` if it must survive trial restarts (then shut it
down when the experiment ends). A checkpointer started by the driver needs neither.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ray_ckpt.config import CheckpointConfig
from ray_ckpt.errors import CorruptCheckpointError
from ray_ckpt.index import CheckpointInfo
from ray_ckpt.safejson import parse_json
from ray_ckpt.store import CheckpointStore
from ray_ckpt.uri import normalize_storage_uri

if TYPE_CHECKING:
    import ray.train

logger = logging.getLogger(__name__)

POINTER_FILE = "ray_ckpt_pointer.json"
POINTER_FORMAT = "ray-ckpt-pointer"
POINTER_VERSION = 1

Target = Literal["auto", "tune", "train"]

# Storage option names never written into a pointer (Ray copies pointers into its own storage).
_SECRET_NAMES = {
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "session_token",
    "access_key",
    "secret_key",
    "account_key",
    "sas_token",
    "credentials",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "client_secret",
    "private_key",
}
_SECRET_PARTS = ("secret", "token", "password", "passwd", "credential", "private_key", "access_key", "account_key")


def _is_secret(name: str) -> bool:
    """Whether a storage option name looks like a credential."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS)


def public_storage_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The storage options minus anything that looks like a credential (recursively), for pointers."""
    public: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if _is_secret(str(name)):
            continue
        if isinstance(value, Mapping):
            value = public_storage_options(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            logger.debug("storage option %r is not JSON-serialisable; left out of the pointer", name)
            continue
        public[str(name)] = value
    return public


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two option mappings (``override`` wins)."""
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = _merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def pointer_dict(info: CheckpointInfo, config: CheckpointConfig) -> dict[str, Any]:
    """The JSON payload of a pointer to the committed checkpoint ``info`` of ``config``'s run."""
    if not isinstance(info, CheckpointInfo):
        raise TypeError(f"info: expected CheckpointInfo (from SaveFuture.result()), got {type(info).__name__}")
    if not isinstance(config, CheckpointConfig):
        raise TypeError(f"config: expected CheckpointConfig, got {type(config).__name__}")
    return {
        "format": POINTER_FORMAT,
        "version": POINTER_VERSION,
        "storage_uri": normalize_storage_uri(config.storage_uri),
        "run_name": config.run_name,
        "step": int(info.step),
        "uri": info.uri,
        "metrics": dict(info.metrics),
        "world_size": int(info.world_size),
        "storage_options": public_storage_options(config.storage_options),
    }


def write_pointer(directory: str, info: CheckpointInfo, config: CheckpointConfig) -> str:
    """Write the pointer JSON into ``directory`` (created if missing); returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, POINTER_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(pointer_dict(info, config), f, indent=2, sort_keys=True)
    return path


def _checkpoint_class(target: Target) -> type:
    """ray.tune.Checkpoint inside Tune (ray.tune.report warns on other classes), else ray.train.Checkpoint."""
    if _resolve_target(target, strict=False) == "tune":
        import ray.tune

        return ray.tune.Checkpoint
    import ray.train

    return ray.train.Checkpoint


def to_ray_checkpoint(
    info: CheckpointInfo, config: CheckpointConfig, *, directory: str | None = None, target: Target = "auto"
) -> ray.train.Checkpoint:
    """A Train/Tune Checkpoint whose directory only points at the committed ray-ckpt checkpoint ``info``.

    Without ``directory`` the pointer goes into a fresh temporary directory, which the caller may
    delete once Ray has persisted it (``report`` does that for you).
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix=f"ray-ckpt-pointer-{info.step}-")
    write_pointer(directory, info, config)
    return _checkpoint_class(target).from_directory(directory)


def read_pointer(checkpoint: Any) -> dict[str, Any]:
    """The pointer JSON of a Train/Tune Checkpoint (local or on Ray's remote storage), validated."""
    name = getattr(checkpoint, "path", checkpoint)
    try:
        filesystem = getattr(checkpoint, "filesystem", None)
        if filesystem is not None:
            with filesystem.open_input_file(f"{checkpoint.path.rstrip('/')}/{POINTER_FILE}") as f:
                raw = f.readall()
        else:
            with open(os.path.join(os.fspath(checkpoint), POINTER_FILE), "rb") as f:
                raw = f.read()
    except FileNotFoundError as exc:
        raise ValueError(f"{name}: not a ray-ckpt pointer checkpoint (no {POINTER_FILE})") from exc
    try:
        pointer = parse_json(raw, name=f"{name}/{POINTER_FILE}")
    except CorruptCheckpointError as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise ValueError(f"{name}/{POINTER_FILE}: not a ray-ckpt pointer (format {pointer.get('format')!r})")
    if pointer.get("version", 0) > POINTER_VERSION:
        raise ValueError(
            f"{name}/{POINTER_FILE}: pointer version {pointer['version']} is newer than this ray-ckpt "
            f"understands ({POINTER_VERSION}); upgrade ray-ckpt"
        )
    missing = [k for k in ("storage_uri", "run_name", "step") if k not in pointer]
    if missing:
        raise ValueError(f"{name}/{POINTER_FILE}: missing {missing}")
    step = pointer["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name}/{POINTER_FILE}: step must be a non-negative integer, got {step!r}")
    return pointer


def store_from_pointer(
    pointer: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None
) -> CheckpointStore:
    """The CheckpointStore of the run a pointer names (``storage_options`` add credentials etc.)."""
    options = _merge(pointer.get("storage_options") or {}, storage_options or {})
    return CheckpointStore(pointer["storage_uri"], run_name=pointer["run_name"], storage_options=options)


def load_from_ray_checkpoint(
    checkpoint: Any, *, storage_options: Mapping[str, Any] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """Load ``(step, state_dict, trainer_state)`` of the ray-ckpt checkpoint a pointer checkpoint names."""
    pointer = read_pointer(checkpoint)
    store = store_from_pointer(pointer, storage_options=storage_options)
    step = int(pointer["step"])
    expected = pointer.get("uri")
    if expected and expected != store.step_uri(step):
        logger.warning(
            "pointer names %s but its run resolves step %d to %s; loading the latter",
            expected, step, store.step_uri(step),
        )
    state = store.load(step)
    trainer_state = store.load_trainer_state(step)
    logger.info("loaded step %d of run %s from a Ray pointer checkpoint", step, pointer["run_name"])
    return step, state, trainer_state


def resume_step(config: CheckpointConfig, restored_step: int | None) -> int:
    """The next step to save in ``config``'s run after restoring ``restored_step`` (from any run).

    Never at or below the run's own latest commit: after a PBT exploit (another trial's older
    step) or a failure between save and report, numbering carries on past what the run already
    holds, so ``latest`` always is the newest state and nothing committed is overwritten.
    """
    latest = CheckpointStore(config=config).latest()
    candidates = [0 if restored_step is None else int(restored_step) + 1]
    if latest is not None:
        candidates.append(latest.step + 1)
    return max(candidates)


def _in_tune() -> bool:
    """Whether this process runs a Ray Tune function trainable (not a Train worker)."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session

        return bool(_in_tune_session())
    except Exception:
        return False


def _in_train() -> bool:
    """Whether this process runs a Ray Train (V2) training function."""
    try:
        from ray.train.v2._internal.util import _in_ray_train_worker

        if _in_ray_train_worker():
            return True
    except Exception:
        pass
    try:  # Train V1 (RAY_TRAIN_V2_ENABLED=0): a session with a world rank
        from ray.train._internal.session import get_session

        session = get_session()
        return session is not None and session.world_rank is not None
    except Exception:
        return False


def _resolve_target(target: Target, *, strict: bool = True) -> str:
    """Turn ``"auto"`` into ``"tune"`` or ``"train"`` by looking at the current session."""
    if target in ("tune", "train"):
        return target
    if target != "auto":
        raise ValueError(f"target: must be 'auto', 'tune' or 'train', got {target!r}")
    if _in_tune():
        return "tune"
    if _in_train():
        return "train"
    if strict:
        raise RuntimeError(
            "report(): not inside a Ray Tune trial or a Ray Train worker; call it from the training "
            "function, or pass target='tune' / target='train'"
        )
    return "train"


def report(
    metrics: Mapping[str, Any],
    info: CheckpointInfo | None,
    config: CheckpointConfig,
    *,
    target: Target = "auto",
    **report_kwargs: Any,
) -> None:
    """Report metrics to Tune or Train with a pointer to the committed checkpoint ``info`` (None: metrics only).

    ``target="auto"`` picks ``ray.tune.report`` inside a Tune trial and ``ray.train.report``
    inside a Train worker. In Ray Train every rank must call this the same number of times (it
    is a barrier); usually rank 0 passes ``info`` and the others ``None``. The temporary pointer
    directory is removed once Ray has persisted it.
    """
    resolved = _resolve_target(target)
    if resolved == "tune":
        import ray.tune

        reporter = ray.tune.report
    else:
        import ray.train

        reporter = ray.train.report
    if info is None:
        reporter(dict(metrics), checkpoint=None, **report_kwargs)
        return
    # Ray copies the pointer during a synchronous report; an async/no-upload report still needs it.
    mode = report_kwargs.get("checkpoint_upload_mode")
    cleanup = resolved == "tune" or mode is None or str(getattr(mode, "value", mode)).upper() == "SYNC"
    directory = tempfile.mkdtemp(prefix=f"ray-ckpt-pointer-{info.step}-")
    try:
        checkpoint = to_ray_checkpoint(info, config, directory=directory, target=resolved)  # type: ignore[arg-type]
        reporter(dict(metrics), checkpoint=checkpoint, **report_kwargs)
    finally:
        if cleanup:
            shutil.rmtree(directory, ignore_errors=True)
