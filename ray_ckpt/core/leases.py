"""Leases: a reader's protection of a committed step from retention, with an expiry.

A lease is a small file ``leases/step_<n>.<id>.json``; anyone may write one (evaluation workers
in other processes do), so the writer reads them before it deletes. The handshake with retention
(:meth:`Leases.retire`) guarantees that a granted lease is never lost: retention puts up a
tombstone and re-reads the leases; a lease is written before it checks for the tombstone.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.layout import LEASES_DIR, MARKER_FILE, RETIRING_FILE, step_dir, validate_step
from ray_ckpt.core.safejson import DAMAGE, MAX_STEP, DamageLog, JsonObject
from ray_ckpt.core.storage.base import is_temp_name
from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

_LEASE_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


def validate_ttl(ttl_s: Any) -> float:
    """A lease's time to live: a finite number of seconds > 0 (ValueError naming ``ttl_s``)."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"lease ttl_s: must be a finite number of seconds > 0, got {ttl_s!r}")
    return float(ttl_s)


def lease_path(step: int, lease_id: str) -> str:
    """A lease record's path; the id must be one :meth:`Leases.acquire` made (never a path)."""
    if not isinstance(lease_id, str) or not _LEASE_ID_RE.fullmatch(lease_id):
        raise ValueError(f"lease_id: expected an id acquire_lease returned, got {lease_id!r}")
    return f"{LEASES_DIR}/step_{validate_step(step):09d}.{lease_id}.json"


class Leases:
    """The leases of one run on one storage."""

    def __init__(self, storage: Storage, run_name: str, damaged: DamageLog) -> None:
        self.storage = storage
        self.run_name = run_name
        self.damaged = damaged

    def acquire(self, step: int, ttl_s: float, holder: str = "") -> str:
        """Protect a committed step from retention for ``ttl_s`` seconds; returns the lease id."""
        step = validate_step(step)
        lease_id = uuid.uuid4().hex[:16]
        self._write(step, lease_id, ttl_s, holder)
        # Written first, checked second: retention either sees this lease or we see its tombstone.
        if not self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            self.release(step, lease_id)
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} to lease")
        if self.storage.exists(f"{step_dir(step)}/{RETIRING_FILE}"):
            self.release(step, lease_id)
            raise CheckpointNotFoundError(f"step {step} of run {self.run_name!r} is being deleted by retention")
        return lease_id

    def renew(self, step: int, lease_id: str, ttl_s: float, holder: str = "") -> None:
        """Push a lease's expiry ``ttl_s`` seconds into the future."""
        self._write(validate_step(step), lease_id, ttl_s, holder)

    def release(self, step: int, lease_id: str) -> None:
        self.storage.rm(lease_path(step, lease_id), missing_ok=True)

    def _write(self, step: int, lease_id: str, ttl_s: float, holder: str) -> None:
        path = lease_path(step, lease_id)
        expires = time.time() + validate_ttl(ttl_s)
        record = {"step": step, "lease_id": lease_id, "holder": str(holder), "expires": expires}
        self.storage.write_atomic(path, json.dumps(record).encode())

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every readable lease record with its path; a damaged one is skipped with one warning.

        One listing plus one read per lease: the cost grows with the leases held (a few per
        evaluation worker), not with the run's steps.
        """
        for name in self.storage.list_names(LEASES_DIR):
            if is_temp_name(name) or not name.endswith(".json"):
                continue
            path = f"{LEASES_DIR}/{name}"
            try:
                doc = JsonObject.parse(self.storage.read_bytes(path), name=path)
                record = {
                    "step": doc.int("step", lo=0, hi=MAX_STEP),
                    "lease_id": doc.str("lease_id", ""),
                    "holder": doc.any("holder", ""),
                    "expires": doc.float("expires"),
                }
            except FileNotFoundError:
                continue
            except DAMAGE as exc:
                self.damaged.skip(exc, "the lease is ignored")
                continue
            yield path, record

    def active(self) -> list[dict[str, Any]]:
        """Lease records that have not expired."""
        now = time.time()
        return [record for _, record in self.records() if record["expires"] > now]

    def leased_steps(self) -> set[int]:
        return {r["step"] for r in self.active()}

    def expire(self) -> int:
        """Delete expired lease records; returns how many."""
        now, removed = time.time(), 0
        for path, record in self.records():
            if record["expires"] <= now:
                self.storage.rm(path, missing_ok=True)
                removed += 1
        return removed

    def retire(self, step: int, delete: Callable[[int], None]) -> bool:
        """Delete a step retention doomed unless a lease on it appeared meanwhile; True if deleted.

        The leases were read before deciding, and a reader may have leased the step since. So a
        tombstone goes up first and the leases are read again: a lease written before the
        tombstone is seen here (the step is kept), and a reader that leases after it sees the
        tombstone and is refused (see :meth:`acquire`). Either way no granted lease is lost.
        """
        tombstone = f"{step_dir(step)}/{RETIRING_FILE}"
        self.storage.write_bytes(tombstone, b"")
        if step in self.leased_steps():
            self.storage.rm(tombstone, missing_ok=True)
            logger.info("retention kept step %d of %s: it was leased while retention decided", step, self.run_name)
            return False
        delete(step)
        return True
