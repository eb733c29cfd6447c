"""Reading committed steps: load (whole, by key, mmap), verify, headers, trainer state.

Every check that ``load`` makes, ``verify`` makes too (plus every checksum): the index against
the marker, every indexed tensor in its shard's header, the state's structure and aliases. Only
files the marker lists are opened. A step deleted or replaced during a read is reported, never
returned as a mix of versions.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError
from ray_ckpt.core.format.checks import FileCheck, check_header, tensor_chunks
from ray_ckpt.core.format.digests import FileDigest
from ray_ckpt.core.format.header import SafetensorsHeader, read_safetensors_header
from ray_ckpt.core.format.hf_index import parse_hf_index
from ray_ckpt.core.format.safetensors_io import READ_CHUNK, map_safetensors, read_box_into, read_safetensors
from ray_ckpt.core.format.tree import check_structure, structure_keys, tensor_leaves, unflatten_state
from ray_ckpt.core.layout import MARKER_FILE, TRAINER_JSON, TRAINER_STATE_JSON, TRAINER_TENSORS, Manifest, step_dir
from ray_ckpt.core.safejson import JsonObject
from ray_ckpt.core.storage.storage import Storage


class StepReader:
    """Reads the committed steps of one run on one storage."""

    def __init__(self, storage: Storage, run_name: str, *, directory: Callable[[int], str] = step_dir) -> None:
        self.storage = storage
        self.run_name = run_name
        # Where a step's files are: its own directory, or a staged replacement being proven
        # before it is swapped in (see ray_ckpt.core.writer.prove_staged).
        self.step_dir = directory

    def read_manifest(self, step: int) -> Manifest:
        """The parsed checkpoint.json of a committed step."""
        path = f"{self.step_dir(step)}/{MARKER_FILE}"
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step}") from exc
        manifest = Manifest.from_json_bytes(data, name=f"{self.step_dir(step)}/{MARKER_FILE}")
        if manifest.step != step:
            raise CorruptCheckpointError(f"{path}: records step {manifest.step}, expected {step}", path=path)
        return manifest

    def load(
        self, manifest: Manifest, keys: Iterable[str] | None = None, *, verify: bool, mmap: bool = False
    ) -> dict[str, Any]:
        """A committed step's state dict (tensors on CPU), or only ``keys`` of it.

        With ``verify`` every byte returned is checked against the digests its writer recorded
        (see :mod:`ray_ckpt.core.format.digests`). With ``mmap`` (local storage only) the tensors are
        copy-on-write maps of the files, checked once when mapped. A step deleted or replaced while it is
        read raises CheckpointNotFoundError, never a mix of versions.
        """
        if mmap and not self.storage.is_local:
            raise ValueError(f"mmap=True needs local storage; run {self.run_name!r} is on {self.storage.uri!r}")
        if manifest.kind != "state_dict":
            raise ValueError(
                f"step {manifest.step} holds trainer-written files (kind {manifest.kind!r}); use its path instead"
            )
        with self._unchanged(manifest):
            return self._load_state(manifest, keys, verify, mmap=mmap)

    def _load_state(
        self, manifest: Manifest, keys: Iterable[str] | None, verify: bool, *, mmap: bool = False
    ) -> dict[str, Any]:
        step, model = manifest.step, manifest.model
        aliases: dict[str, str] = dict(model.get("aliases") or {})
        index_name = model["index"]
        weight_map = self._weight_map(manifest, verify=verify)
        keys = None if keys is None else list(keys)  # any iterable (a generator is read only once)
        wanted = None if keys is None else [aliases.get(k, k) for k in keys]
        if wanted is not None:
            unknown = [k for k in wanted if k not in weight_map]
            if unknown:
                raise KeyError(f"step {step}: no tensors named {unknown[:5]}")
        files: dict[str, list[str] | None] = {}
        for key, fname in weight_map.items():
            if wanted is None or key in wanted:
                files.setdefault(fname, [])
                files[fname].append(key)  # type: ignore[union-attr]
        tensors: dict[str, torch.Tensor] = {}
        for fname, file_keys in files.items():
            loaded = self._load_shard(
                manifest,
                fname,
                None if wanted is None else file_keys,
                verify=verify,
                fmt=model.get("format", "safetensors"),
                mmap=mmap,
            )
            missing = [k for k in (file_keys or []) if k not in loaded]
            if missing:
                raise CorruptCheckpointError(
                    f"{self.step_dir(step)}/{fname}: missing tensors {missing[:5]} listed in {index_name}"
                )
            tensors.update({k: loaded[k] for k in file_keys or loaded})
        if wanted is not None:
            return {k: tensors[aliases.get(k, k)] for k in keys}  # type: ignore[union-attr]
        return unflatten_state(tensors, model.get("structure"), aliases)

    def _weight_map(self, manifest: Manifest, *, verify: bool) -> dict[str, str]:
        """The model's index, checked against the marker (the checks load and verify share).

        Every file the index names is a committed file of the step, and every tensor the state's
        structure or its aliases refer to is indexed.
        """
        index_name = manifest.model.get("index")
        directory = self.step_dir(manifest.step)
        if not index_name:
            raise CorruptCheckpointError(f"{directory}/{MARKER_FILE}: no model index recorded")
        path = f"{directory}/{index_name}"
        weight_map = parse_hf_index(self._read_file(manifest, index_name, verify=verify), name=path)
        for fname in set(weight_map.values()):
            self._file_path(manifest, fname)
        _check_indexed(path, manifest.model.get("structure"), manifest.model.get("aliases") or {}, weight_map)
        return weight_map

    def tensor_headers(self, manifest: Manifest) -> dict[str, SafetensorsHeader]:
        """The validated safetensors header of every model shard of a step, by file name.

        Only files the step's marker lists are opened, and each header must hold every tensor the
        index maps to it (what ``ray-ckpt inspect`` shows and :meth:`verify` checks).
        """
        if manifest.model.get("format", "safetensors") != "safetensors":
            raise ValueError(f"step {manifest.step} is in {manifest.model.get('format')!r} format: no headers")
        return self._check_shards(manifest, self._weight_map(manifest, verify=False))

    def _check_shards(self, manifest: Manifest, weight_map: Mapping[str, str]) -> dict[str, SafetensorsHeader]:
        """Each shard's header (or, for ``pt``, its weights-only contents) holds what the index lists."""
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        headers: dict[str, SafetensorsHeader] = {}
        fmt = manifest.model.get("format", "safetensors")
        for fname, keys in sorted(by_file.items()):
            path = self._file_path(manifest, fname)
            if fmt == "safetensors":
                headers[fname] = self.file_header(manifest, fname)
                present: Iterable[str] = headers[fname].entries
            else:
                present = self._load_shard(manifest, fname, None, verify=False, fmt=fmt)
            missing = [k for k in keys if k not in present]
            if missing:
                raise CorruptCheckpointError(
                    f"{path}: missing tensors {missing[:5]} listed in {manifest.model.get('index')}", path=path
                )
        return headers

    def file_header(self, manifest: Manifest, name: str) -> SafetensorsHeader:
        """The validated header of one safetensors file the step's marker lists."""
        path = self._file_path(manifest, name)
        try:
            with self.storage.open_read(path) as f:
                return read_safetensors_header(f, name=path, file_size=manifest.files[name].size)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc

    def _trainer_layout(self, manifest: Manifest, *, verify: bool) -> tuple[Any, dict[str, str], dict[str, str]]:
        """trainer_state.json's structure, aliases and weight map, checked (a damaged file names itself).

        Steps written before the ``trainer_state/`` directory (by versions before 1703474,
        2026-12-01; kept so their runs resume) hold one ``trainer_state.safetensors`` beside the
        model: their weight map is every tensor of that file.
        """
        legacy = TRAINER_STATE_JSON not in manifest.files
        name = TRAINER_JSON if legacy else TRAINER_STATE_JSON
        path = f"{self.step_dir(manifest.step)}/{name}"
        doc = JsonObject.parse(self._read_file(manifest, name, verify=verify), name=path)
        aliases = doc.dict("aliases", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise doc.error("aliases", "expected an object of tensor names -> tensor names")
        structure = doc.any("structure")
        try:
            check_structure(structure)
        except ValueError as exc:
            raise doc.error("structure", str(exc)) from None
        if legacy:
            weight_map = {k: TRAINER_TENSORS for k in self.file_header(manifest, TRAINER_TENSORS).entries}
        else:
            weight_map = doc.dict("weight_map")
            for key, fname in weight_map.items():
                if not isinstance(fname, str) or fname not in manifest.files:
                    raise doc.error("weight_map", f"{key!r}: {fname!r} is not a file listed in {MARKER_FILE}")
        _check_indexed(path, structure, aliases, weight_map)
        return structure, aliases, weight_map

    def _file_path(self, manifest: Manifest, name: str) -> str:
        if name not in manifest.files:
            raise CorruptCheckpointError(f"{self.step_dir(manifest.step)}/{name}: not listed in {MARKER_FILE}")
        return f"{self.step_dir(manifest.step)}/{name}"

    def _read_file(self, manifest: Manifest, name: str, *, verify: bool) -> bytes:
        path = self._file_path(manifest, name)
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc
        if verify:
            _check_digest(path, data, manifest.files[name])
        return data

    def _missing(self, step: int, name: str) -> Exception:
        if not self.storage.exists(f"{self.step_dir(step)}/{MARKER_FILE}"):
            return CheckpointNotFoundError(f"step {step} of run {self.run_name!r} was deleted while being read")
        return CorruptCheckpointError(f"{self.step_dir(step)}/{name}: missing", path=f"{self.step_dir(step)}/{name}")

    def _load_shard(
        self,
        manifest: Manifest,
        name: str,
        keys: list[str] | None,
        *,
        verify: bool,
        fmt: str = "safetensors",
        mmap: bool = False,
    ) -> dict[str, torch.Tensor]:
        path = self._file_path(manifest, name)
        expected = manifest.files[name]
        try:
            size = self.storage.size(path)
            if size != expected.size:
                raise CorruptCheckpointError(
                    f"{path}: size {size} differs from the committed {expected.size} (truncated or replaced)", path=path
                )
            if fmt == "pt":
                data = self.storage.read_bytes(path, limit=None) if verify or not mmap else b""
                if verify:
                    _check_digest(path, data, expected)
                try:
                    source = self.storage.local_path(path) if mmap else io.BytesIO(data)
                    loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
                except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CorruptCheckpointError(
                        f"{path}: not a weights-only torch file (refused, nothing unpickled beyond tensors): {first}",
                        path=path,
                    ) from exc
                return loaded if keys is None else {k: loaded[k] for k in keys if k in loaded}
            if mmap:
                return map_safetensors(
                    self.storage.local_path(path), name=path, keys=keys, expected=expected if verify else None
                )
            with self.storage.open_read(path) as f:
                return read_safetensors(f, name=path, file_size=size, keys=keys, expected=expected if verify else None)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc

    def load_trainer_state(self, manifest: Manifest, *, verify: bool) -> Any:
        """The trainer state saved with a step (None if it had none)."""
        if not manifest.trainer_state:
            return None
        with self._unchanged(manifest):
            structure, aliases, weight_map = self._trainer_layout(manifest, verify=verify)
            tensors: dict[str, torch.Tensor] = {}
            for fname in sorted(set(weight_map.values())):
                tensors.update(self._load_shard(manifest, fname, None, verify=verify))
            _check_indexed(f"{self.step_dir(manifest.step)}/{TRAINER_STATE_JSON}", structure, aliases, tensors)
        return unflatten_state(tensors, structure, aliases)

    # -- resharding loads -----------------------------------------------------------------------
    def load_into(
        self, manifest: Manifest, into: Mapping[str, Any], *, trainer: bool = False, verify: bool = True
    ) -> None:
        """Fill the tensors of ``into`` in place from a committed step, resharding as needed.

        Each value may be a tensor (filled whole, e.g. pinned or GPU memory), a DTensor or a
        :class:`~ray_ckpt.core.shard.Shard` (filled with its own box of the saved tensor, for any world
        size, mesh and placements). Only the bytes of each box are read: positioned reads locally,
        ranged reads on an object store. With ``verify`` every byte is checked against its block
        digests (the reads widen to whole blocks: at most one block more at each edge of a box);
        a step written before block digests has each file it reads from hashed whole once first.
        ValueError names the key when a target's dtype or global shape differs from the
        checkpoint's; KeyError lists keys the step does not hold.
        """
        if manifest.kind != "state_dict":
            raise ValueError(f"step {manifest.step} holds trainer-written files (kind {manifest.kind!r})")
        what = "trainer_state" if trainer else "state_dict"
        leaves = tensor_leaves(into, what=f"into ({what})")
        with self._unchanged(manifest):
            if trainer:
                if not manifest.trainer_state:
                    raise KeyError(f"step {manifest.step} has no trainer state to load into")
                _, aliases, weight_map = self._trainer_layout(manifest, verify=False)
            else:
                aliases = dict(manifest.model.get("aliases") or {})
                weight_map = self._weight_map(manifest, verify=False)
            missing = [k for k in leaves if aliases.get(k, k) not in weight_map]
            if missing:
                raise KeyError(f"step {manifest.step}: no tensors named {missing[:5]} ({what})")
            headers: dict[str, SafetensorsHeader] = {}
            by_file: dict[str, list[str]] = {}
            for key in leaves:
                by_file.setdefault(weight_map[aliases.get(key, key)], []).append(key)
            for fname, keys in sorted(by_file.items()):
                header = headers[fname] = self.file_header(manifest, fname)
                path = self._file_path(manifest, fname)
                blocks = manifest.files[fname].blocks if verify else None
                if verify and blocks is None:
                    # only a whole-file checksum (a format_version 1 step, written before 20e4da1,
                    # or a file the store did not write itself): read whole once to check it
                    self._check_file(manifest, fname)
                if blocks is not None:
                    check_header(header, manifest.files[fname], name=path)
                with self.storage.open_read(path) as f:
                    for key in keys:
                        saved = aliases.get(key, key)
                        entry = header.entries.get(saved)
                        if entry is None:
                            raise CorruptCheckpointError(
                                f"{path}: missing tensor {key!r} listed in the index", path=path
                            )
                        chunks = None
                        if blocks is not None:
                            chunks = tensor_chunks(entry, header.data_start, blocks, key=saved, name=path)
                        read_box_into(
                            f,
                            entry,
                            header.data_start,
                            leaves[key],
                            key=key,
                            name=path,
                            chunks=chunks,
                            block_size=blocks.block_size if blocks is not None else 0,
                        )

    @contextlib.contextmanager
    def _unchanged(self, manifest: Manifest) -> Iterator[None]:
        """Fail a read whose step was deleted or replaced while it ran (its files may be a mix).

        A replacement (``overwrite=True``) deletes the marker before any new file appears, so a
        read that saw a new file finds the marker missing or different afterwards. Checked after
        the read, and on a corruption error (a replaced file fails its checksum).
        """
        try:
            yield
        except (CorruptCheckpointError, CheckpointNotFoundError):
            self._check_unchanged(manifest)
            raise
        self._check_unchanged(manifest)

    def _check_unchanged(self, manifest: Manifest) -> None:
        step = manifest.step
        try:
            current = self.read_manifest(step)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"step {step} of run {self.run_name!r} was deleted while being read"
            ) from None
        if (current.created, current.files) != (manifest.created, manifest.files):
            raise CheckpointNotFoundError(
                f"step {step} of run {self.run_name!r} was replaced (overwritten) while being read; load it again"
            )

    def _check_file(self, manifest: Manifest, name: str) -> None:
        """Stream one file of a step through its digests (every block, or its whole-file checksum)."""
        path = self._file_path(manifest, name)
        check = FileCheck(manifest.files[name], name=path)
        try:
            with self.storage.open_read(path) as f:
                while chunk := f.read(READ_CHUNK):
                    check.update(chunk)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc
        check.finish()

    def verify(self, manifest: Manifest) -> None:
        """Check a checkpoint as strictly as :meth:`load` does, plus every file's digests (every block).

        Every listed file present with its committed size and checksum; the model index, every
        shard header (dtypes, shapes, offsets) and every tensor the index and the state's structure
        name; the trainer state's structure against its tensors. Streams files (no whole-file
        reads). Raises CorruptCheckpointError naming the first bad file.
        """
        step = manifest.step
        for name, digest in sorted(manifest.files.items()):
            path = f"{self.step_dir(step)}/{name}"
            try:
                size = self.storage.size(path)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{path}: missing", path=path) from exc
            if size != digest.size:
                raise CorruptCheckpointError(f"{path}: size {size} differs from the committed {digest.size}", path=path)
            self._check_file(manifest, name)
            if name.endswith(".safetensors"):
                self.file_header(manifest, name)
        if manifest.kind == "state_dict":
            self._check_shards(manifest, self._weight_map(manifest, verify=False))
        if manifest.trainer_state:
            _, _, weight_map = self._trainer_layout(manifest, verify=False)
            for fname in sorted(set(weight_map.values())):
                entries = self.file_header(manifest, fname).entries
                missing = [k for k, f in weight_map.items() if f == fname and k not in entries]
                if missing:
                    path = f"{self.step_dir(step)}/{fname}"
                    raise CorruptCheckpointError(f"{path}: missing trainer tensors {missing[:5]}", path=path)


def _check_indexed(path: str, structure: Any, aliases: Mapping[str, str], present: Iterable[str]) -> None:
    """Every tensor a state's structure or aliases name is in ``present`` (CorruptCheckpointError)."""
    have = set(present)
    needed = set(aliases.values())
    if structure is not None:
        needed.update(aliases.get(k, k) for k in structure_keys(structure))
    missing = sorted(needed - have)
    if missing:
        raise CorruptCheckpointError(f"{path}: tensors {missing[:5]} of the saved state are missing", path=path)


def _check_digest(path: str, data: bytes, digest: FileDigest) -> None:
    """A file read whole, against its record (CorruptCheckpointError naming it)."""
    if len(data) != digest.size:
        raise CorruptCheckpointError(f"{path}: size {len(data)} differs from the committed {digest.size}", path=path)
    check = FileCheck(digest, name=path)
    check.update(data)
    check.finish()
