"""Glue between ray-ckpt and Ray Train / Ray Tune checkpoints, with no second format.

A Train/Tune ``Checkpoint`` made here is a tiny *pointer* directory: one JSON file naming the
storage URI, run, step and step URI of a committed ray-ckpt checkpoint (plus any non-secret
storage options). Ray copies that directory into its own storage as usual, Tune's schedulers
(PBT exploit, trial restore) pass it around, and whoever resumes from it reads the weights
straight from ray-ckpt storage::

    info = client.save(step, model.state_dict(), metrics=m, blocking=True).result()
    ray_ckpt.distributed.train_tune.report(m, info, config)            # ray.tune.report or ray.train.report

    checkpoint = ray.tune.get_checkpoint()                   # or ray.train.get_checkpoint()
    if checkpoint is not None:
        step, state, trainer_state = load_from_ray_checkpoint(checkpoint)

Starting a checkpointer *inside* a Tune trial: pass ``scheduling_strategy="DEFAULT"`` (Tune
captures child actors into the trial's placement group and kills them when it removes that group
on a trial stop or failure) and ``detached=True`` if it must survive trial restarts (then shut it
down when the experiment ends). A checkpointer started by the driver needs neither.

One truth for retention (docs/RAY.md): a step that Ray still references is never deleted by
ray-ckpt. ``report`` leases the step it hands Ray (before Ray sees the pointer) and, after each
report, releases the leases of steps whose pointer Ray has deleted from its storage (its own
``CheckpointConfig(num_to_keep=...)`` at work). Storage therefore holds the union of what ray-ckpt's
rules keep and what Ray's ``Result.checkpoint``, ``best_checkpoints`` and PBT donors name.
``get_checkpoint(config)`` is ``ray.train.get_checkpoint()`` / ``ray.tune.get_checkpoint()`` that
also resumes from the run's latest committed step when Ray has none (a re-``fit()`` under a new
trial, ``Trainer.restore``) or names an older step of the same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.safejson import parse_json
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.core.uri import normalize_storage_uri
from ray_ckpt.distributed.ray_config import retention_from_ray
from ray_ckpt.tiers.tiered import open_store

if TYPE_CHECKING:
    import ray.train

logger = logging.getLogger(__name__)

POINTER_FILE = "ray_ckpt_pointer.json"
POINTER_FORMAT = "ray-ckpt-pointer"
POINTER_VERSION = 1

# Leases that keep the steps Ray references: their holder names the Ray directory of the pointers.
RAY_HOLDER_PREFIX = "ray-pointers:"
# Lifetime of such a lease; every report (and get_checkpoint) renews the ones past half of it, so
# only an experiment nobody runs for this long loses its protection (release_unreferenced ends it).
RAY_LEASE_TTL_S = 30 * 24 * 3600.0
# A copy of each pointer Ray holds, beside its checkpoint folders (Ray never deletes this one), and
# how many of the pointers Ray has deleted stay resolvable (their steps leased): synchronous PBT
# can hand an exploiting trial a donor checkpoint that Ray's num_to_keep deleted just before.
SIDECAR_DIR = ".ray_ckpt_pointers"
RAY_DELETED_POINTER_GRACE = 2
# In a pointer folder ray-ckpt put back after Ray deleted it (Ray's own restore refuses a
# checkpoint folder that is gone before ray-ckpt's code runs): ray-ckpt removes it again later.
RESTORED_MARKER = ".ray_ckpt_restored"
# Beside each pointer copy in SIDECAR_DIR, ``<folder>.restored`` says that ray-ckpt put that folder
# back (one listing of SIDECAR_DIR tells Ray's own folders from those); KEEPER_FILE says that a
# PointerKeeper callback runs on the Tune driver for this directory.
RESTORED_SUFFIX = ".restored"
KEEPER_FILE = "keeper"
# Driver steps in a row that PointerKeeper sees end with a failed trial, paused ones and none
# running or about to run before it stops the experiment (one step is 0.1 s when nothing happens).
STALLED_STEPS = 3
# How much of the end of a failed trial's error file PointerKeeper reads to name its error.
TRIAL_ERROR_TAIL_BYTES = 64 * 1024
# A lease load_from_ray_checkpoint holds while it reads a step (a PBT donor may move on meanwhile).
LOAD_LEASE_TTL_S = 600.0

__all__ = [
    "LOAD_LEASE_TTL_S",
    "POINTER_FILE",
    "RAY_HOLDER_PREFIX",
    "RAY_LEASE_TTL_S",
    "get_checkpoint",
    "load_from_ray_checkpoint",
    "pointer_dict",
    "ray_checkpoint_config",
    "read_pointer",
    "release_unreferenced",
    "report",
    "resume_step",
    "retention_from_ray",
    "store_from_pointer",
    "to_ray_checkpoint",
    "write_pointer",
]

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


def _checkpoint_location(checkpoint: Any) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` of a Train/Tune Checkpoint (a local path: the local filesystem)."""
    filesystem = getattr(checkpoint, "filesystem", None)
    if filesystem is None:
        import pyarrow.fs

        filesystem = pyarrow.fs.LocalFileSystem()
    return filesystem, str(getattr(checkpoint, "path", None) or os.fspath(checkpoint)).rstrip("/")


def _exists(filesystem: Any, path: str) -> bool:
    from pyarrow.fs import FileType

    return filesystem.get_file_info(path).type != FileType.NotFound


def _sidecar_path(checkpoint_path: str) -> str:
    """Where reconcile keeps a copy of the pointer in ``checkpoint_path``: beside Ray's checkpoint
    folders, in ``<Ray directory>/.ray_ckpt_pointers/<folder>.json``, which Ray never deletes."""
    parent, _, name = checkpoint_path.rstrip("/").rpartition("/")
    return f"{parent}/{SIDECAR_DIR}/{name}.json"


def read_pointer(checkpoint: Any) -> dict[str, Any]:
    """The pointer JSON of a Train/Tune Checkpoint (local or on Ray's remote storage), validated.

    A checkpoint folder Ray has deleted by its own retention (``CheckpointConfig(num_to_keep)``)
    while something still names it (synchronous PBT's exploit can) resolves through the copy
    ``report`` keeps beside it, to the step ray-ckpt holds; without one it is a
    CheckpointNotFoundError saying so. A folder that exists without a pointer is a ValueError
    (not a ray-ckpt checkpoint).
    """
    filesystem, path = _checkpoint_location(checkpoint)
    try:
        with filesystem.open_input_file(f"{path}/{POINTER_FILE}") as f:
            raw = f.readall()
    except FileNotFoundError as exc:
        if _exists(filesystem, path):
            raise ValueError(f"{path}: not a ray-ckpt pointer checkpoint (no {POINTER_FILE})") from exc
        try:
            with filesystem.open_input_file(_sidecar_path(path)) as f:
                raw = f.readall()
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{path}: Ray's checkpoint folder is gone (deleted by Ray's own retention, "
                "CheckpointConfig(num_to_keep), or by hand) and ray-ckpt kept no copy of its pointer, so which "
                "step it named is unknown; report checkpoints with ray_ckpt.distributed.train_tune.report "
                "(it keeps one), "
                "or keep more of Ray's checkpoints (num_to_keep)"
            ) from exc
        pointer = _parse_pointer(raw, path)
        logger.info(
            "%s: Ray deleted this checkpoint folder (its num_to_keep); it named step %d of run %s, which "
            "ray-ckpt still holds: using that",
            path,
            pointer["step"],
            pointer["run_name"],
        )
        return pointer
    return _parse_pointer(raw, path)


def _parse_pointer(raw: bytes, name: Any) -> dict[str, Any]:
    """Validate the bytes of a pointer file (``name`` says where it came from)."""
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
    """The CheckpointStore of the run a pointer names (``storage_options`` add credentials etc.).

    The one call for a resharded load of a pointer's step (a PBT donor's, for FSDP2 trials):
    ``store_from_pointer(read_pointer(ckpt)).load(step, into=model_sd)``, then
    ``.load_trainer_state(step, into={"optim": optim_sd})`` (see docs/RAY.md).
    """
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
            expected,
            step,
            store.step_uri(step),
        )
    lease_id = _lease_for_load(store, step, pointer)
    try:
        state = store.load(step)
        trainer_state = store.load_trainer_state(step)
    finally:
        if lease_id is not None:
            store.release_lease(step, lease_id)
    logger.info("loaded step %d of run %s from a Ray pointer checkpoint", step, pointer["run_name"])
    return step, state, trainer_state


def _lease_for_load(store: CheckpointStore, step: int, pointer: Mapping[str, Any]) -> str | None:
    """Lease the step a pointer names while it is read; a clear error when it is gone.

    A storage the reader may not write to (a read-only bucket) is read without a lease.
    """
    try:
        return store.acquire_lease(step, LOAD_LEASE_TTL_S, holder="load_from_ray_checkpoint")
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"the Ray checkpoint names step {step} of run {pointer['run_name']!r} "
            f"({pointer.get('uri') or store.step_uri(step)}), which that run no longer holds: {exc}. "
            "Steps that Ray references are leased by ray_ckpt.distributed.train_tune.report; was this pointer "
            "reported another way, or its lease released?"
        ) from exc
    except OSError as exc:
        logger.debug("could not lease step %d of %s for loading (%s); reading without a lease", step, store, exc)
        return None


def resume_step(config: CheckpointConfig, restored_step: int | None) -> int:
    """The next step to save in ``config``'s run after restoring ``restored_step`` (from any run).

    Never at or below the run's own latest commit: after a PBT exploit (another trial's older
    step) or a failure between save and report, numbering carries on past what the run already
    holds, so ``latest`` always is the newest state and nothing committed is overwritten.
    """
    latest = open_store(config).latest()
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


# -- one truth for retention: leases on the steps Ray references ---------------------------------
def _same_run(pointer: Mapping[str, Any], config: CheckpointConfig) -> bool:
    """Whether a pointer names a step of ``config``'s run."""
    try:
        same_root = normalize_storage_uri(str(pointer.get("storage_uri"))) == normalize_storage_uri(config.storage_uri)
    except Exception:
        return False
    return same_root and pointer.get("run_name") == config.run_name


def _location_uri(filesystem: Any, path: str) -> str:
    """A URI for a directory on a pyarrow filesystem (what a lease's holder records)."""
    kind = getattr(filesystem, "type_name", "local")
    if kind == "local":
        return path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{path.lstrip('/')}"


def _ray_pointer_location() -> tuple[Any, str] | None:
    """``(filesystem, directory)`` where Ray persists this process's reported checkpoints, if any.

    Train V2: the run's experiment directory; Train V1 and Tune: the trial directory.
    """
    try:
        from ray.train.v2._internal.util import _in_ray_train_worker

        if _in_ray_train_worker():
            from ray.train.v2._internal.execution.context import get_train_context

            storage = get_train_context().get_storage()
            return storage.storage_filesystem, storage.experiment_fs_path
    except Exception as exc:  # not a V2 worker, or a Ray without these internals
        logger.debug("no Ray Train V2 storage context: %s", exc)
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        storage = getattr(session, "storage", None) if session is not None else None
        if storage is not None:
            return storage.storage_filesystem, storage.trial_fs_path
    except Exception as exc:
        logger.debug("no Ray Train V1 / Tune storage context: %s", exc)
    return None


def _pointer_steps(
    filesystem: Any, directory: str, config: CheckpointConfig, cache: dict[str, int | None] | None = None
) -> set[int]:
    """Steps of ``config``'s run named by the pointer checkpoints Ray holds in ``directory``."""
    return set(_pointer_paths(filesystem, directory, config, cache).values())


def _pointer_paths(
    filesystem: Any,
    directory: str,
    config: CheckpointConfig,
    cache: dict[str, int | None] | None = None,
    *,
    keep_copies: bool = False,
    skip_restored: bool = False,
    names: set[str] | None = None,
) -> dict[str, int]:
    """``{checkpoint folder: step}`` of the pointers into ``config``'s run Ray holds in ``directory``.

    One listing; each pointer is read once (``cache``: Ray never rewrites a checkpoint directory).
    A directory without a readable pointer yet (an upload in flight) is read again next time.
    ``keep_copies``: a copy of each new pointer goes beside Ray's folders (:func:`_sidecar_path`),
    so that the folder still resolves after Ray deletes it. ``skip_restored``: leave out the
    folders ray-ckpt put back (:data:`RESTORED_MARKER`), which Ray no longer references.
    ``names`` (if given) receives the name of every checkpoint folder listed, whoever's it is.
    """
    from pyarrow.fs import FileSelector, FileType

    cache = {} if cache is None else cache
    found: dict[str, int] = {}
    for entry in filesystem.get_file_info(FileSelector(directory, allow_not_found=True)):
        if entry.type != FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        if names is not None:
            names.add(entry.base_name)
        if entry.path not in cache:
            try:
                with filesystem.open_input_file(f"{entry.path}/{POINTER_FILE}") as f:
                    raw = f.readall()
                pointer = _parse_pointer(raw, entry.path)
            except (FileNotFoundError, ValueError, OSError) as exc:
                logger.debug("%s: no ray-ckpt pointer (yet): %s", entry.path, exc)
                continue
            ours = _same_run(pointer, config)
            if skip_restored and _exists(filesystem, f"{entry.path}/{RESTORED_MARKER}"):
                ours = False
            if ours and keep_copies:
                sidecar = _sidecar_path(entry.path)
                filesystem.create_dir(sidecar.rpartition("/")[0], recursive=True)
                with filesystem.open_output_stream(sidecar) as f:
                    f.write(raw)
            cache[entry.path] = int(pointer["step"]) if ours else None
        step = cache[entry.path]
        if step is not None:
            found[entry.path] = step
    return found


class _RayProtection:
    """The leases that keep the steps of one run which one Ray directory's pointers name.

    ``protect(step)`` leases a step before Ray is handed its pointer; ``reconcile()`` lists the
    pointers Ray still holds, leases any it names that lack a lease, renews leases past half their
    life, and releases the leases of steps no pointer names any more (Ray deleted them by its own
    retention). A step reported here whose pointer has not shown up yet (an upload in flight) is
    never released.
    """

    def __init__(self, config: CheckpointConfig, filesystem: Any, directory: str) -> None:
        self.config = config
        self.filesystem = filesystem
        self.directory = directory
        self.holder = RAY_HOLDER_PREFIX + _location_uri(filesystem, directory)
        self.store = open_store(config)
        self.leases: dict[int, tuple[str, float]] = {}  # step -> (lease id, expiry)
        for record in self.store.active_leases():
            if record["holder"] == self.holder and record["step"] not in self.leases:
                self.leases[record["step"]] = (record["lease_id"], record["expires"])
        self.pending: set[int] = set()
        self._pointers: dict[str, int | None] = {}
        self._warned = False  # said once that no PointerKeeper runs while Ray deletes pointers
        self._lock = threading.Lock()

    def _acquire(self, step: int) -> None:
        lease_id = self.store.acquire_lease(step, RAY_LEASE_TTL_S, holder=self.holder)
        self.leases[step] = (lease_id, time.time() + RAY_LEASE_TTL_S)

    def protect(self, step: int) -> None:
        """Lease ``step`` (a CheckpointNotFoundError if retention already deleted it)."""
        with self._lock:
            if step not in self.leases:
                try:
                    self._acquire(step)
                except CheckpointNotFoundError as exc:
                    raise CheckpointNotFoundError(
                        f"step {step} of run {self.config.run_name!r} was deleted before it was reported to Ray "
                        f"({exc}); report each step before ray-ckpt's retention can drop it (keep_last_n larger "
                        "than the saves in flight), or pass a newer step"
                    ) from exc
            self.pending.add(step)

    def reconcile(self) -> list[int]:
        """Match the leases to the pointers Ray holds now; returns the steps released.

        The pointers Ray deleted most recently (the newest ``RAY_DELETED_POINTER_GRACE``) stay
        resolvable, their folders put back and their steps leased (:func:`_settle_deleted`): PBT
        can hand an exploiting trial a donor's checkpoint that Ray's ``num_to_keep`` has just
        deleted. Older ones are forgotten.
        """
        with self._lock:
            names: set[str] = set()
            listed = _pointer_paths(
                self.filesystem, self.directory, self.config, self._pointers, keep_copies=True, names=names
            )
            restored, kept, keeper = _settle_deleted(self.filesystem, self.directory, names)
            ours = {p: step for p, step in listed.items() if p.rpartition("/")[2] not in restored}  # Ray's own
            kept_steps = set()
            for path, raw in kept.items():
                if path not in self._pointers:
                    try:
                        pointer = _parse_pointer(raw, path)
                    except ValueError as exc:
                        logger.warning("%s: its pointer copy is damaged, so the folder is not kept: %s", path, exc)
                        continue
                    self._pointers[path] = int(pointer["step"]) if _same_run(pointer, self.config) else None
                if self._pointers[path] is not None:
                    kept_steps.add(self._pointers[path])
            if kept and not keeper and not self._warned and _in_tune():
                self._warned = True
                logger.warning(
                    "Ray deleted pointer folders of run %s in %s (its CheckpointConfig(num_to_keep)); ray-ckpt "
                    "puts the newest %d back at this trial's reports, but with PBT an exploiting trial can be "
                    "restored from one before that and fail ('does not exist on storage anymore'; synchronous "
                    "PBT then waits forever): pass RunConfig(callbacks=[ray_ckpt.distributed.train_tune."
                    "PointerKeeper()]) to put them back on the driver at once (docs/RAY.md)",
                    self.config.run_name,
                    self.directory,
                    RAY_DELETED_POINTER_GRACE,
                )
            referenced = set(ours.values()) | kept_steps
            self.pending -= referenced
            now = time.time()
            for step in sorted(referenced):
                lease = self.leases.get(step)
                if lease is None:
                    try:
                        self._acquire(step)
                    except CheckpointNotFoundError as exc:
                        logger.warning(
                            "Ray references step %d of run %s, which is gone: %s", step, self.config.run_name, exc
                        )
                elif lease[1] - now < RAY_LEASE_TTL_S / 2:
                    self.store.renew_lease(step, lease[0], RAY_LEASE_TTL_S, holder=self.holder)
                    self.leases[step] = (lease[0], now + RAY_LEASE_TTL_S)
            released = sorted(s for s in self.leases if s not in referenced and s not in self.pending)
            for step in released:
                self.store.release_lease(step, self.leases.pop(step)[0])
        if released:
            logger.info(
                "run %s: Ray no longer references steps %s; their leases are released (retention may delete them)",
                self.config.run_name,
                released,
            )
        return released


def _settle_deleted(
    filesystem: Any, directory: str, names: set[str], keep: int = RAY_DELETED_POINTER_GRACE
) -> tuple[set[str], dict[str, bytes], bool]:
    """Keep the newest ``keep`` pointer folders Ray deleted from ``directory`` in place; forget older ones.

    Decided from storage alone, so that the trial (at each report) and the Tune driver
    (:class:`PointerKeeper`, right after Ray deletes) always agree: a folder is Ray's own when it
    is listed (``names``) without a ``<folder>.restored`` mark in :data:`SIDECAR_DIR`; a pointer
    copy there whose folder is not Ray's own is one Ray deleted. The newest ``keep`` of those are
    put back from their copies (mark first, then the folder with :data:`RESTORED_MARKER` inside);
    older ones lose folder, mark and copy. Returns ``(names of the folders ray-ckpt put back,
    {kept folder path: pointer bytes}, whether a PointerKeeper runs for this directory)``.
    """
    from pyarrow.fs import FileSelector, FileType

    sidecar_dir = f"{directory.rstrip('/')}/{SIDECAR_DIR}"
    copies: set[str] = set()
    restored: set[str] = set()
    keeper = False
    for entry in filesystem.get_file_info(FileSelector(sidecar_dir, allow_not_found=True)):
        if entry.type != FileType.File:
            continue
        if entry.base_name.endswith(".json"):
            copies.add(entry.base_name.removesuffix(".json"))
        elif entry.base_name.endswith(RESTORED_SUFFIX):
            restored.add(entry.base_name.removesuffix(RESTORED_SUFFIX))
        elif entry.base_name == KEEPER_FILE:
            keeper = True
    deleted = sorted(name for name in copies if name not in names or name in restored)
    recent, old = (deleted[-keep:], deleted[:-keep]) if keep else ([], deleted)
    kept: dict[str, bytes] = {}
    for name in recent:
        path = f"{directory.rstrip('/')}/{name}"
        try:
            with filesystem.open_input_file(f"{sidecar_dir}/{name}.json") as f:
                raw = f.readall()
            if name not in names:  # Ray deleted it since the last look: put it back, marked as ours
                with filesystem.open_output_stream(f"{sidecar_dir}/{name}{RESTORED_SUFFIX}") as f:
                    f.write(b"put back by ray-ckpt after Ray deleted it\n")
                restored.add(name)
                filesystem.create_dir(path, recursive=True)
                with filesystem.open_output_stream(f"{path}/{POINTER_FILE}") as f:
                    f.write(raw)
                with filesystem.open_output_stream(f"{path}/{RESTORED_MARKER}") as f:
                    f.write(b"put back by ray-ckpt after Ray deleted it; removed again by ray-ckpt\n")
                logger.info("put back the pointer folder %s, which Ray deleted (a PBT exploit may still name it)", path)
        except (FileNotFoundError, OSError) as exc:
            logger.warning("could not keep the pointer folder %s Ray deleted: %s", path, exc)
            continue
        kept[path] = raw
    for name in old:  # out of the window: forget it, and take back what ray-ckpt put back
        if name in restored:
            with contextlib.suppress(FileNotFoundError, OSError):
                filesystem.delete_dir(f"{directory.rstrip('/')}/{name}")
            with contextlib.suppress(FileNotFoundError, OSError):
                filesystem.delete_file(f"{sidecar_dir}/{name}{RESTORED_SUFFIX}")
            restored.discard(name)
        with contextlib.suppress(FileNotFoundError, OSError):
            filesystem.delete_file(f"{sidecar_dir}/{name}.json")
    return restored, kept, keeper


_PROTECTIONS: dict[tuple[str, str, str], _RayProtection] = {}
_PROTECTIONS_LOCK = threading.Lock()


def _protection(config: CheckpointConfig) -> _RayProtection | None:
    """This process's protection of ``config``'s run in the current Ray session (None outside one)."""
    location = _ray_pointer_location()
    if location is None:
        return None
    filesystem, directory = location
    key = (
        RAY_HOLDER_PREFIX + _location_uri(filesystem, directory),
        normalize_storage_uri(config.storage_uri),
        config.run_name,
    )
    with _PROTECTIONS_LOCK:
        protection = _PROTECTIONS.get(key)
        if protection is None:
            protection = _PROTECTIONS[key] = _RayProtection(config, filesystem, directory)
        return protection


def _reconcile_quietly(protection: _RayProtection | None) -> None:
    """Reconcile, logging a failure (a storage hiccup) instead of failing the caller."""
    if protection is None:
        return
    try:
        protection.reconcile()
    except Exception as exc:
        logger.warning(
            "run %s: could not match its leases to Ray's checkpoints (retried at the next report): %s",
            protection.config.run_name,
            exc,
        )


def release_unreferenced(
    config: CheckpointConfig,
    *,
    storage_filesystem: Any = None,
    handle: Any = None,
) -> list[int]:
    """Release the Ray leases of ``config``'s run whose step no Ray pointer names any more.

    Call it on the driver after ``fit()`` (Ray deletes its old checkpoints after the last report,
    so the trial's last leases outlive them) or for an experiment directory that was deleted. Every
    lease ``report`` took names its Ray directory; ``storage_filesystem`` is the pyarrow filesystem
    of ``RunConfig(storage_filesystem=...)`` when Ray's storage is not a plain path or URI. With
    ``handle`` (the run's ``CheckpointerHandle``) retention runs right away; without one the next
    commit (or ``CheckpointStore.apply_retention()``) deletes what no rule keeps. The pointer
    folders ray-ckpt put back after Ray deleted them (see :func:`_settle_deleted`) are removed
    and their steps released, except those a trial's final ``Result.checkpoint`` names (a PBT
    exploit after the trial's last report), which :class:`PointerKeeper` hands over to Ray at the
    end of the experiment. Returns the steps whose leases were released.
    """
    import pyarrow.fs

    store = open_store(config)
    by_location: dict[str, list[dict[str, Any]]] = {}
    for record in store.active_leases():
        holder = str(record["holder"])
        if holder.startswith(RAY_HOLDER_PREFIX):
            by_location.setdefault(holder[len(RAY_HOLDER_PREFIX) :], []).append(record)
    released: list[int] = []
    for location, records in by_location.items():
        if storage_filesystem is not None:
            filesystem, directory = storage_filesystem, location.split("://", 1)[-1]
        else:
            filesystem, directory = pyarrow.fs.FileSystem.from_uri(location)
        referenced = set(_pointer_paths(filesystem, directory, config, skip_restored=True).values())
        _remove_put_back(filesystem, directory)
        for record in records:
            if record["step"] not in referenced:
                store.release_lease(record["step"], record["lease_id"])
                released.append(record["step"])
    released = sorted(set(released))
    if released:
        logger.info(
            "run %s: released the Ray leases of steps %s (no Ray checkpoint names them)", config.run_name, released
        )
    if handle is not None:
        handle.apply_retention()
    return released


def _remove_put_back(filesystem: Any, directory: str) -> None:
    """Remove the pointer folders ray-ckpt put back in ``directory`` (after ``fit()`` nothing needs them)."""
    from pyarrow.fs import FileSelector, FileType

    for entry in filesystem.get_file_info(FileSelector(directory, allow_not_found=True)):
        if entry.type == FileType.Directory and entry.base_name.startswith("checkpoint_"):
            if _exists(filesystem, f"{entry.path}/{RESTORED_MARKER}"):
                with contextlib.suppress(FileNotFoundError, OSError):
                    filesystem.delete_dir(entry.path)
                for suffix in (RESTORED_SUFFIX, ".json"):  # else the next reconcile would put it back
                    with contextlib.suppress(FileNotFoundError, OSError):
                        filesystem.delete_file(f"{directory.rstrip('/')}/{SIDECAR_DIR}/{entry.base_name}{suffix}")


_POINTER_KEEPER: type | None = None


def _pointer_keeper_class() -> type:
    """Define :class:`PointerKeeper` on first use (it subclasses ``ray.tune.Callback``, and importing
    Ray Tune costs a second that nothing else in this module needs)."""
    global _POINTER_KEEPER
    if _POINTER_KEEPER is not None:
        return _POINTER_KEEPER
    from pyarrow.fs import FileSelector, FileType
    from ray.tune import Callback

    class PointerKeeper(Callback):
        """A Tune callback that keeps the pointer folders Ray deletes resolvable, on the driver.

        Ray's ``CheckpointConfig(num_to_keep)`` deletes a trial's old checkpoint folders on the
        driver, but PBT may still hand one to an exploiting trial, whose restore checks that the
        folder exists before any ray-ckpt code runs (synchronous PBT pauses the donor right after
        the report that deleted it, so the trial's own put-back comes too late, and then waits
        forever for the failed trial). This callback copies each new pointer before Ray registers
        it, and right after Ray registers it (and deletes whatever ``num_to_keep`` drops) puts back
        the newest ``RAY_DELETED_POINTER_GRACE`` deleted folders, by the same rule the trials
        apply (:func:`_settle_deleted`; their leases keep the steps). A trial that still fails
        because its checkpoint folder is gone stops the experiment at once with an error saying
        so, instead of a wait, and so does any trial failing for good while the others wait for it
        (synchronous PBT, see :meth:`on_step_end`). At the end, a put-back folder that a trial's
        final checkpoint names becomes Ray's (``release_unreferenced`` keeps it). Pass it as
        ``RunConfig(callbacks=[PointerKeeper()])``.
        """

        def __init__(self) -> None:
            self._directories: dict[str, tuple[Any, str]] = {}  # trial id -> (filesystem, trial directory)
            self._failed: dict[str, str] = {}  # trial id -> its error, of the trials that failed for good
            self._stalled_steps = 0  # consecutive driver steps that ended with paused trials only

        def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
            """Before Ray registers ``checkpoint`` (and may delete an older one): copy its pointer."""
            filesystem, path = _checkpoint_location(checkpoint)
            try:
                with filesystem.open_input_file(f"{path}/{POINTER_FILE}") as f:
                    raw = f.readall()
                _parse_pointer(raw, path)
            except (FileNotFoundError, ValueError, OSError):
                return  # not a ray-ckpt pointer: Ray's own checkpoint, nothing to keep
            sidecar = _sidecar_path(path)
            sidecar_dir = sidecar.rpartition("/")[0]
            if trial.trial_id not in self._directories:
                filesystem.create_dir(sidecar_dir, recursive=True)
                with filesystem.open_output_stream(f"{sidecar_dir}/{KEEPER_FILE}") as f:
                    f.write(b"a ray-ckpt PointerKeeper runs on the Tune driver for this directory\n")
                self._directories[trial.trial_id] = (filesystem, path.rpartition("/")[0])
            with filesystem.open_output_stream(sidecar) as f:
                f.write(raw)

        def on_trial_save(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            """Right after Ray registered a checkpoint (``num_to_keep`` may have deleted one): put back."""
            location = self._directories.get(trial.trial_id)
            if location is None:
                return
            filesystem, directory = location
            try:
                names = {
                    entry.base_name
                    for entry in filesystem.get_file_info(FileSelector(directory, allow_not_found=True))
                    if entry.type == FileType.Directory and entry.base_name.startswith("checkpoint_")
                }
                _settle_deleted(filesystem, directory, names)
            except OSError as exc:
                logger.warning("could not keep the pointer folders Ray deleted in %s: %s", directory, exc)

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            """A folder ray-ckpt put back that a trial's final checkpoint names (a PBT exploit after
            the trial's last report) is Ray's reference now: unmark it, so that it stays."""
            for trial in trials:
                checkpoint = trial.checkpoint
                if checkpoint is None:
                    continue
                filesystem, path = _checkpoint_location(checkpoint)
                if not _exists(filesystem, f"{path}/{RESTORED_MARKER}"):
                    continue
                parent, _, name = path.rpartition("/")
                for mark in (f"{parent}/{SIDECAR_DIR}/{name}{RESTORED_SUFFIX}", f"{path}/{RESTORED_MARKER}"):
                    with contextlib.suppress(FileNotFoundError, OSError):
                        filesystem.delete_file(mark)
                logger.info("%s: trial %s's final checkpoint, put back by ray-ckpt, is kept", path, trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            """A trial failed for good (Tune calls this only when it will not retry it): remember its
            error for :meth:`on_step_end`; one whose checkpoint folder is gone fails the experiment now."""
            self._failed[trial.trial_id] = _trial_error(trial)
            checkpoint = trial.checkpoint
            if checkpoint is None:
                return
            filesystem, path = _checkpoint_location(checkpoint)
            if _exists(filesystem, path):
                return
            raise RuntimeError(
                f"trial {trial.trial_id} failed and cannot be restored: its checkpoint folder {path} is gone "
                "(deleted by Ray's CheckpointConfig(num_to_keep) while a PBT exploit or retry still named it; "
                f"ray-ckpt keeps the newest {RAY_DELETED_POINTER_GRACE} deleted pointer folders of each trial). "
                "Synchronous PBT would wait for this trial forever. Raise num_to_keep (with PBT at least "
                "perturbation_interval - 1) or leave it unset (docs/RAY.md)"
            )

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            """Stop an experiment that can only wait forever, with the failed trials' errors.

            Synchronous PBT pauses each trial at a perturbation until every live trial got there,
            and Tune keeps a failed trial among the live ones: after a trial fails for good (no
            retry left), the others pause at the next perturbation and none is ever resumed. The
            sign, whatever the scheduler: a trial failed, no trial runs or is about to (Tune sets a
            paused trial its scheduler picks to PENDING in the same step), some are paused, for
            :data:`STALLED_STEPS` driver steps in a row. With no trial running nothing can change
            the scheduler's mind, so this is the wait forever, never a slow experiment.
            """
            if not self._failed:
                return
            statuses = {str(t.status) for t in trials}
            if "PAUSED" not in statuses or statuses & {"RUNNING", "PENDING"}:
                self._stalled_steps = 0
                return
            self._stalled_steps += 1
            if self._stalled_steps < STALLED_STEPS:
                return
            failed = "; ".join(f"trial {trial_id} failed: {error}" for trial_id, error in self._failed.items())
            paused = ", ".join(t.trial_id for t in trials if str(t.status) == "PAUSED")
            raise RuntimeError(
                f"{failed}. Tune does not retry it (no FailureConfig(max_failures) left), and trials {paused} are "
                "paused with none running: the scheduler resumes none of them (synchronous PBT waits until every "
                "live trial reached the perturbation point, which a failed trial never does), so the experiment "
                "would wait forever. Stopped instead: fix the trial's error or allow retries "
                "(FailureConfig(max_failures=N))"
            )

    PointerKeeper.__module__ = __name__
    PointerKeeper.__qualname__ = "PointerKeeper"
    _POINTER_KEEPER = PointerKeeper
    return PointerKeeper


def _trial_error(trial: Any, limit: int = TRIAL_ERROR_TAIL_BYTES) -> str:
    """The last line of a failed Tune trial's error (its exception), for a message naming it.

    Read from the end of the driver's copy of Tune's error file (written there first; its copy
    in Ray's storage is synced later), at most ``limit`` bytes: Tune appends every failure.
    """
    try:
        path = trial.error_file
        if path:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                text = f.read().decode("utf-8", errors="replace")
        else:
            text = str(trial.get_error() or "")[-limit:]
    except Exception as exc:  # noqa: BLE001 - the error file is unreadable: say so instead
        return f"(its error could not be read: {exc})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "(no error recorded)"


def __getattr__(name: str) -> Any:
    """``PointerKeeper`` is defined on first access (see :func:`_pointer_keeper_class`)."""
    if name == "PointerKeeper":
        return _pointer_keeper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ray_checkpoint_config(config: CheckpointConfig, **overrides: Any) -> Any:
    """A ``ray.train.CheckpointConfig`` whose ``num_to_keep`` follows ``config``'s retention.

    ``keep_top_k`` (with ``metric_name``/``mode``) becomes Ray's ranked ``num_to_keep``; else
    ``keep_last_n`` its newest-N; neither keeps every pointer (Ray's default). The metric must be
    one you also pass to ``report``. Ray then lists the same best steps ray-ckpt keeps, and the
    leases never hold a step past ray-ckpt's own rules for long.
    """
    import ray.train

    options: dict[str, Any] = {}
    if config.keep_top_k and config.metric_name:
        options = {
            "num_to_keep": config.keep_top_k,
            "checkpoint_score_attribute": config.metric_name,
            "checkpoint_score_order": config.mode,
        }
    elif config.keep_last_n:
        options = {"num_to_keep": config.keep_last_n}
    options.update(overrides)
    return ray.train.CheckpointConfig(**options)


def get_checkpoint(config: CheckpointConfig, *, target: Target = "auto") -> ray.train.Checkpoint | None:
    """``ray.train.get_checkpoint()`` / ``ray.tune.get_checkpoint()`` that also knows the ray-ckpt run.

    * Ray hands back a checkpoint: it is returned, unless it points into ``config``'s own run at a
      step older than the run's latest commit (a failure between a save and its report); then the
      latest commit is returned instead. A pointer into another run (a PBT donor) is kept.
    * Ray hands back none but the run has committed steps (a re-``fit()`` that Ray runs as a new
      trial, ``Trainer.restore`` of a finished run, a new Ray run name): a pointer checkpoint of the
      run's latest committed step.
    * Neither: None (start from scratch).

    Either way ``load_from_ray_checkpoint`` loads it and the loop carries on at ``step + 1``. It
    also leases the steps Ray's existing pointers name before the loop saves anything.
    """
    resolved = _resolve_target(target, strict=False)
    if resolved == "tune":
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
    else:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
    _reconcile_quietly(_protection(config))
    latest = open_store(config).latest()
    if checkpoint is not None:
        try:
            pointer = read_pointer(checkpoint)  # a folder Ray deleted: its kept copy, else CheckpointNotFoundError
        except ValueError:
            return checkpoint  # a folder without a pointer: Ray's own checkpoint
        filesystem, path = _checkpoint_location(checkpoint)
        if not _exists(filesystem, path):  # resolved through the copy: a pointer of our own to that step
            donor = store_from_pointer(pointer)
            return to_ray_checkpoint(donor.info(int(pointer["step"])), donor.config, target=resolved)  # type: ignore[arg-type]
        if latest is None or not _same_run(pointer, config) or latest.step <= int(pointer["step"]):
            return checkpoint
        logger.info(
            "Ray's checkpoint names step %d of run %s, whose latest commit is step %d: resuming from step %d",
            pointer["step"],
            config.run_name,
            latest.step,
            latest.step,
        )
    elif latest is None:
        return None
    else:
        logger.info(
            "Ray hands back no checkpoint, but run %s has committed steps: resuming from its latest, step %d",
            config.run_name,
            latest.step,
        )
    return to_ray_checkpoint(latest, config, target=resolved)  # type: ignore[arg-type]


def report(
    metrics: Mapping[str, Any],
    info: CheckpointInfo | None,
    config: CheckpointConfig,
    *,
    target: Target = "auto",
    protect: bool = True,
    **report_kwargs: Any,
) -> None:
    """Report metrics to Tune or Train with a pointer to the committed checkpoint ``info`` (None: metrics only).

    ``target="auto"`` picks ``ray.tune.report`` inside a Tune trial and ``ray.train.report``
    inside a Train worker. In Ray Train every rank must call this the same number of times (it
    is a barrier); usually rank 0 passes ``info`` and the others ``None``. The temporary pointer
    directory is removed once Ray has persisted it.

    With ``protect`` (the default) the step is leased before Ray sees its pointer, and the leases
    of steps whose pointers Ray has since deleted are released (docs/RAY.md): ray-ckpt never
    deletes a step that Ray's ``Result.checkpoint``, ``best_checkpoints`` or a PBT donor names.
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
    protection = _protection(config) if protect else None
    if protection is not None:
        protection.protect(int(info.step))
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
    _reconcile_quietly(protection)
