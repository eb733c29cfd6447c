"""Migration of legacy checkpoints into the ray-ckpt layout, one run per run name.

A legacy checkpoint is a file (see :mod:`ray_ckpt.interop.legacy`) or a Hugging Face model folder
(``save_pretrained``, ``huggingface_hub.save_torch_state_dict``, DCP's HuggingFaceStorageWriter),
which is always ONE checkpoint, however many shards it has. :func:`import_checkpoint` imports
one of them as a given step of a given run (``ray-ckpt import``). Every checkpoint is written
by :meth:`CheckpointStore.save` (same format, commit protocol and checksums as any other save).
Re-running is safe: a step already committed with the same tensors
and metrics is skipped; a different one is a conflict unless ``replace=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ckpt.core.errors import ArchitectureNotAllowedError, ConfigError, CorruptCheckpointError
from ray_ckpt.core.format.buffers import to_buffer
from ray_ckpt.core.layout import EVAL_FILE, MARKER_FILE, Manifest, read_metrics_file, validate_step
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.core.uri import normalize_storage_uri, parse_uri
from ray_ckpt.interop.legacy import LegacyCheckpoint, find_hf_folder, find_legacy_files, read_legacy

logger = logging.getLogger(__name__)

MIGRATED = "migrated"
REPLACED = "replaced"
SKIPPED = "skipped"
WOULD_MIGRATE = "would migrate"
WOULD_REPLACE = "would replace"
CONFLICT = "conflict"
FAILED = "failed"


@dataclass
class MigrationItem:
    """What migration did (or would do) with one source file."""

    source: str
    action: str
    run_name: str | None = None
    step: int | None = None
    format: str | None = None
    detail: str = ""
    nbytes: int = 0  # bytes of the source read (for progress)

    @property
    def ok(self) -> bool:
        return self.action not in (CONFLICT, FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "action": self.action,
            "run_name": self.run_name,
            "step": self.step,
            "format": self.format,
            "detail": self.detail,
            "nbytes": self.nbytes,
        }


@dataclass
class MigrationReport:
    """Every file's outcome, in the order processed."""

    items: list[MigrationItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no file failed or conflicted."""
        return all(item.ok for item in self.items)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            out[item.action] = out.get(item.action, 0) + 1
        return out


def read_step_folder(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Storage, Manifest] | None:
    """(storage, parsed marker) of a folder holding one ray-ckpt step as ``ray-ckpt download``
    writes it (the step's files, its checkpoint.json, the run's model_architecture.json, its
    eval_metrics.json); None for anything else."""
    try:
        storage = Storage(normalize_storage_uri(location), storage_options)
        if not storage.fs.isdir(storage.root):
            return None
        data = storage.read_bytes(MARKER_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return storage, Manifest.from_json_bytes(data, name=storage.url(MARKER_FILE))


def import_step_folder(
    storage: Storage,
    manifest: Manifest,
    store: CheckpointStore,
    *,
    step: int | None = None,
    replace: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> Any:
    """Commit a downloaded step folder into ``store`` as the step it was (``step`` renumbers it):
    metrics, metadata, trainer state, scores and architecture kept, every file checksum-checked
    (:meth:`CheckpointStore.copy_step`). Its CheckpointInfo."""
    import dataclasses

    from ray_ckpt.core.architecture import ARCHITECTURE_FILE

    if step is not None:
        manifest = dataclasses.replace(manifest, step=validate_step(step))
    try:
        architecture: bytes | None = storage.read_bytes(ARCHITECTURE_FILE)
    except FileNotFoundError:
        architecture = None
    try:
        scores = read_metrics_file(storage.read_bytes(EVAL_FILE), name=storage.url(EVAL_FILE))
    except FileNotFoundError:
        scores = {}
    return store.copy_step(
        storage, "", manifest, architecture=architecture, eval_metrics=scores, overwrite=replace, on_chunk=on_chunk
    )


def plan_migration(source: str, *, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """Every checkpoint under ``source`` (a file or a Hugging Face folder each) with its size in bytes."""
    plan = []
    for location in find_legacy_files(source, storage_options=storage_options):
        step_folder = read_step_folder(location, storage_options)
        if step_folder is not None:
            plan.append((location, sum(d.size for d in step_folder[1].files.values())))
            continue
        folder = find_hf_folder(location, storage_options=storage_options)
        if folder is not None:
            plan.append((location, folder.total_size))
            continue
        parent, _, name = location.rpartition("/")
        try:
            size = Storage(parent, storage_options).size(name)
        except (FileNotFoundError, OSError):
            size = 0
        plan.append((location, size))
    return plan


def migrate(
    source: str,
    destination: str,
    *,
    dry_run: bool = False,
    replace: bool = False,
    trust_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_item: Callable[[MigrationItem], None] | None = None,
    allowed_architecture_prefixes: list[str] | None = None,
    on_plan: Callable[[list[tuple[str, int]]], None] | None = None,
) -> MigrationReport:
    """Migrate a legacy file or directory into runs under ``destination`` (a storage URI).

    A Hugging Face model folder anywhere under ``source`` is one checkpoint (never one per
    shard). ``dry_run`` reads and compares but writes nothing. ``on_plan`` gets the
    ``(location, bytes)`` of every checkpoint found before any is read, ``on_item`` each outcome
    (for progress output). A bad checkpoint is reported and skipped; the others still migrate.
    A pickled model's class is recorded in ``model_architecture.json`` only when it is allowed
    by ``allowed_architecture_prefixes`` (None: ``torch.nn``, ``transformers`` and the modules
    trusted in this process; a class from a pickle is never trusted by itself) and rebuilds the
    checkpoint's shapes; otherwise its name goes into the metadata as ``model_class``.
    """
    report = MigrationReport()
    stores: dict[str, CheckpointStore] = {}
    plan = plan_migration(source, storage_options=storage_options)
    logger.info("migrate: %d legacy checkpoints under %s", len(plan), source)
    if on_plan is not None:
        on_plan(plan)
    for location, nbytes in plan:
        folder = read_step_folder(location, storage_options)
        if folder is not None:
            item = _migrate_step_folder(location, *folder, destination, stores, dry_run=dry_run, replace=replace,
                                        storage_options=storage_options)  # fmt: skip
            item.nbytes = nbytes
            report.items.append(item)
            if on_item is not None:
                on_item(item)
            continue
        try:
            ckpt = read_legacy(location, storage_options=storage_options, trust_pickle=trust_pickle, cache=False)
            item = _migrate_one(
                ckpt,
                destination,
                stores,
                dry_run=dry_run,
                replace=replace,
                storage_options=storage_options,
                allowed_architecture_prefixes=allowed_architecture_prefixes,
            )
        except Exception as exc:  # one bad file must not stop the others; it is reported
            item = MigrationItem(location, FAILED, detail=f"{type(exc).__name__}: {exc}")
        item.nbytes = nbytes
        logger.info("migrate: %s -> %s %s/%s %s", item.source, item.action, item.run_name, item.step, item.detail)
        report.items.append(item)
        if on_item is not None:
            on_item(item)
    return report


def import_checkpoint(
    source: str,
    run_uri: str,
    *,
    step: int | None = None,
    dry_run: bool = False,
    replace: bool = False,
    trust_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    allowed_architecture_prefixes: list[str] | None = None,
) -> MigrationItem:
    """Import ONE checkpoint (a Hugging Face model folder or its index, or a legacy file) as a
    committed step of the run ``run_uri`` (``<storage>/<run_name>``, no selector).

    ``step`` defaults to what the source records (a Trainer's ``global_step``, a number in its
    name, else 0). Same machinery as :func:`migrate` (skip when identical, conflict unless
    ``replace``); a source that cannot be read raises (e.g. one shard of a sharded set).
    """
    parsed = parse_uri(run_uri)
    if parsed.kind != "run" or parsed.selector is not None:
        raise ConfigError(f"{run_uri!r}: expected a run URI (<storage>/<run_name>) without a selector")
    ckpt = read_legacy(source, storage_options=storage_options, trust_pickle=trust_pickle, cache=False)
    ckpt.run_name = parsed.run_name
    if step is not None:
        ckpt.step = validate_step(step)
    folder = find_hf_folder(ckpt.location, storage_options=storage_options) if ckpt.format == "hf" else None
    item = _migrate_one(
        ckpt,
        parsed.storage_uri,
        {},
        dry_run=dry_run,
        replace=replace,
        storage_options=storage_options,
        allowed_architecture_prefixes=allowed_architecture_prefixes,
    )
    item.nbytes = folder.total_size if folder is not None else sum(_nbytes(v) for v in ckpt.state_dict.values())
    logger.info("import: %s -> %s %s/%s %s", item.source, item.action, item.run_name, item.step, item.detail)
    return item


def _migrate_step_folder(
    location: str,
    storage: Storage,
    manifest: Manifest,
    destination: str,
    stores: dict[str, CheckpointStore],
    *,
    dry_run: bool,
    replace: bool,
    storage_options: dict[str, Any] | None,
) -> MigrationItem:
    """A downloaded step folder into the run named after the folder, as the step it was."""
    run_name = location.rstrip("/").rsplit("/", 1)[-1]
    item = MigrationItem(location, MIGRATED, run_name, manifest.step, "ray-ckpt step")
    try:
        store = stores.get(run_name)
        if store is None:
            store = stores[run_name] = CheckpointStore(destination, run_name, storage_options or {})
        exists = manifest.step in store
        if exists and store.read_manifest(manifest.step).files == manifest.files:
            item.action, item.detail = SKIPPED, "already there with the same files"
        elif exists and not replace:
            item.action, item.detail = CONFLICT, "the step exists with other files (replace=True replaces it)"
        elif dry_run:
            item.action = WOULD_REPLACE if exists else WOULD_MIGRATE
        else:
            info = import_step_folder(storage, manifest, store, replace=exists)
            item.action, item.detail = (REPLACED if exists else MIGRATED), f"-> {info.uri}"
    except Exception as exc:  # reported like any other bad checkpoint
        item.action, item.detail = FAILED, f"{type(exc).__name__}: {exc}"
    return item


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _migrate_one(
    ckpt: LegacyCheckpoint,
    destination: str,
    stores: dict[str, CheckpointStore],
    *,
    dry_run: bool,
    replace: bool,
    storage_options: dict[str, Any] | None,
    allowed_architecture_prefixes: list[str] | None = None,
) -> MigrationItem:
    item = MigrationItem(ckpt.location, MIGRATED, ckpt.run_name, ckpt.step, ckpt.format)
    store = stores.get(ckpt.run_name)
    if store is None:
        store = stores[ckpt.run_name] = CheckpointStore(destination, ckpt.run_name, storage_options or {})
    exists = ckpt.step in store
    if exists:
        same = _same_content(store, ckpt)
        if not replace:
            if same:
                item.action, item.detail = SKIPPED, "already migrated with the same content"
            else:
                item.action = CONFLICT
                item.detail = f"step {ckpt.step} of run {ckpt.run_name!r} exists with different content; pass --replace"
            return item
        item.action = WOULD_REPLACE if dry_run else REPLACED
    elif dry_run:
        item.action = WOULD_MIGRATE
    if dry_run:
        item.detail = f"-> {store.step_uri(ckpt.step)}"
        return item
    metadata = {**ckpt.metadata, "migrated_by": "ray-ckpt migrate"}
    if ckpt.architecture is not None:
        why_not = _why_not_rebuilt(ckpt, allowed_architecture_prefixes)
        if why_not is None:
            store.write_architecture(ckpt.architecture)  # the Architecture itself: its config class too
        else:
            metadata["model_class"] = ckpt.architecture.class_path
            item.detail = f"model_architecture.json not written ({why_not}); "
    try:
        info = store.save(ckpt.step, ckpt.state_dict, ckpt.metrics, ckpt.trainer_state, metadata, overwrite=True)
    except TypeError as exc:
        if ckpt.trainer_state is None:
            raise
        info = store.save(ckpt.step, ckpt.state_dict, ckpt.metrics, None, metadata, overwrite=True)
        item.detail = f"trainer state dropped ({exc}); "
    item.detail += f"-> {info.uri}"
    return item


def _why_not_rebuilt(ckpt: LegacyCheckpoint, allowed_architecture_prefixes: list[str] | None) -> str | None:
    """None when the recorded architecture builds a model whose tensors match the checkpoint's,
    else why not.

    A pickled module says its class but not its constructor arguments; recording an
    architecture that builds a differently shaped model would break ``instantiate`` later. The
    class is built under the allow-list rules of :mod:`ray_ckpt.core.architecture` (nothing outside
    it is imported or called), on the meta device where it can (no memory for the weights). A
    Hugging Face model (a config class) may leave out tied weights and be stored in another
    dtype than it builds in: its shapes must match, its keys be a subset of the model's.
    """
    assert ckpt.architecture is not None
    unknown_args = "the class's constructor arguments are unknown"
    hf = ckpt.architecture.config_class is not None
    try:
        ckpt.architecture.resolve(allowed_architecture_prefixes)
    except (ArchitectureNotAllowedError, CorruptCheckpointError) as exc:
        logger.info("%s: %s not rebuilt: %s", ckpt.location, ckpt.architecture.class_path, exc)
        return (
            f"{ckpt.architecture.class_path} is not an allowed architecture; opt its prefix in with "
            "allowed_architecture_prefixes (CLI: --allow-architecture)"
        )
    try:
        try:
            with torch.device("meta"):
                built = ckpt.architecture.build(allowed_architecture_prefixes).state_dict()
        except (ArchitectureNotAllowedError, CorruptCheckpointError):
            raise
        except Exception:  # a constructor that cannot run on meta: build it for real
            built = ckpt.architecture.build(allowed_architecture_prefixes).state_dict()
    except Exception as exc:  # any constructor failure means it cannot be rebuilt
        logger.info("%s: %s does not rebuild: %s", ckpt.location, ckpt.architecture.class_path, exc)
        return unknown_args
    theirs = ckpt.state_dict
    keys_fit = set(theirs) <= set(built) if hf else set(built) == set(theirs)
    same = keys_fit and all(
        isinstance(theirs[k], torch.Tensor)
        and tuple(built[k].shape) == tuple(theirs[k].shape)
        and (hf or built[k].dtype == theirs[k].dtype)
        for k in theirs
    )
    return None if same else unknown_args


def _same_content(store: CheckpointStore, ckpt: LegacyCheckpoint) -> bool:
    """Whether the committed step holds exactly the legacy tensors and (at least) its metrics."""
    info = store.info(ckpt.step)
    if any(info.metrics.get(k) != v for k, v in ckpt.metrics.items()):
        return False
    return _same_tensors(store.load(ckpt.step), ckpt.state_dict)


def _same_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key, left in a.items():
        right = b[key]
        if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
            if not to_buffer(left, key=key).same_contents(to_buffer(right, key=key)):
                return False
        elif isinstance(left, Mapping) and isinstance(right, Mapping):
            if not _same_tensors(left, right):
                return False
        elif left != right:
            return False
    return True
