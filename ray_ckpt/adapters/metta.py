"""Metta-style ``MettaCheckpointManager`` over a ray-ckpt run (optionally tiered: local, then remote).

The calls Metta's trainer and eval tools make today keep working::

    manager = MettaCheckpointManager(run="run1", storage_uri="./train_dir", remote_uri="s3://b/policies")
    uri = manager.save_agent(agent, epoch, {"agent_step": 1000, "score": 0.5})
    manager.save_trainer_state(optimizer, epoch, agent_step, stopwatch_state=...)
    state = manager.load_trainer_state()
    policy = manager.load_from_uri("s3://b/policies/run1:latest")

Only names are translated. An epoch is a ray-ckpt step of the run
(``<storage_uri>/<run>/checkpoints/step_N``); the agent's weights are its state dict
(safetensors, no pickle) and the architecture that rebuilds it is recorded once per run in
``model_architecture.json``. The trainer state is a ray-ckpt trainer-state checkpoint of a
side run, ``<storage_uri>/<run>/trainer_state`` (latest kept, local only). Differences:
``cleanup_old_checkpoints`` never deletes the latest checkpoint (the store's retention keeps
the resume point), and ``load_from_uri`` returns the state dict when no architecture was
recorded.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ray_ckpt.adapters.state import plain_state
from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import step_dir
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.core.uri import key_and_version, normalize_uri, parse_uri, validate_run_name
from ray_ckpt.interop.artifact import load_from_uri as load_artifact
from ray_ckpt.interop.artifact import open_run
from ray_ckpt.tiers.tiered import open_store, tiers_of, uploader_of

logger = logging.getLogger(__name__)

TRAINER_STATE_RUN = "trainer_state"


def _json_safe(data: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as plain JSON data (tensor/numpy scalars become numbers, anything else its str)."""

    def scalar(value: Any) -> Any:
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return value.item()
        return str(value)

    return json.loads(json.dumps(dict(data), default=scalar))


def _numbers(data: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# What MettaCheckpointManager reads of a config (check_consumed(by='MettaCheckpointManager')).
register_consumer("MettaCheckpointManager", {"store", "retention", "tiering"})


class MettaCheckpointManager:
    """Metta's checkpoint manager API (save_agent, trainer state, URIs, LRU policy cache) on ray-ckpt."""

    def __init__(
        self,
        run: str = "default",
        storage_uri: str = "./train_dir",
        remote_uri: str | None = None,
        cache_size: int = 3,
        *,
        storage_options: dict[str, Any] | None = None,
        config: CheckpointConfig | None = None,
        wait_for_upload: bool = True,
    ) -> None:
        validate_run_name(run, field_name="run")
        base = config or CheckpointConfig()
        cfg = base.replace(
            storage_uri=storage_uri,
            run_name=run,
            remote_uri=remote_uri,
            storage_options=dict(base.storage_options if storage_options is None else storage_options),
        )
        self.run = self.run_name = run
        self.cache_size = int(cache_size)
        self.wait_for_upload = wait_for_upload
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._architecture_recorded = False
        self.store = open_store(cfg)
        self.uploads = uploader_of(self.store)  # the uploader, None without a remote tier (for callers)
        self._tiers = tiers_of(self.store)  # the plain stores of the run, local first
        self.local: CheckpointStore = self._tiers[0]  # the local tier
        self.config = cfg
        self._trainer = CheckpointStore(
            self.local.uri, run_name=TRAINER_STATE_RUN, storage_options=cfg.storage_options, keep_last_n=1
        )

    def __repr__(self) -> str:
        return f"MettaCheckpointManager(run={self.run!r}, {self.local.uri!r}, remote={self.config.remote_uri!r})"

    @property
    def run_uri(self) -> str:
        """The run's URI on the local tier (``<storage_uri>/<run>``)."""
        return self.local.uri

    @property
    def checkpoint_dir(self) -> Path | None:
        """The local checkpoints directory (None when storage_uri is not a local disk)."""
        path = self.local.storage.local_path("checkpoints")
        return Path(path) if path else None

    # -- saving -------------------------------------------------------------------------------
    def save_agent(
        self,
        agent: torch.nn.Module | Mapping[str, Any],
        epoch: int,
        metadata: Mapping[str, Any] | None = None,
        *,
        wait_for_upload: bool | None = None,
    ) -> str:
        """Save the agent's state dict as checkpoint ``epoch``; returns its URI.

        With a remote tier the URI is the remote one, returned once uploaded (unless
        ``wait_for_upload=False``: then the local URI, the upload finishing in the background).
        Numeric metadata (``score``, ``agent_step``...) is recorded as metrics too.
        """
        state = plain_state(agent)
        if isinstance(agent, torch.nn.Module) and not self._architecture_recorded:
            try:
                self.store.write_architecture(agent)
                self._architecture_recorded = True
            except TypeError as exc:
                logger.warning("%s: architecture not recorded (%s); loads give state dicts", self.run, exc)
        record = {"run": self.run, "epoch": int(epoch), **_json_safe(metadata or {})}
        info = self.store.save(epoch, state, metrics=_numbers(record), metadata=record, overwrite=True)
        self._forget_cached(epoch)
        wait = self.wait_for_upload if wait_for_upload is None else wait_for_upload
        return self.store.durable_uri(epoch, wait=True) if wait else info.uri

    def save_trainer_state(
        self,
        optimizer: torch.optim.Optimizer | Mapping[str, Any],
        epoch: int,
        agent_step: int,
        stopwatch_state: Mapping[str, Any] | None = None,
        curriculum_state: Mapping[str, Any] | None = None,
        loss_states: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Save the optimizer and counters (plus optional stopwatch/curriculum/loss states); latest kept."""
        state: dict[str, Any] = {
            "optimizer_state": plain_state(optimizer),
            "epoch": int(epoch),
            "agent_step": int(agent_step),
        }
        for name, value in (
            ("stopwatch_state", stopwatch_state),
            ("curriculum_state", curriculum_state),
            ("loss_states", loss_states),
        ):
            if value is not None:
                state[name] = value
        flat = flatten_state(state, what="trainer_state")
        with self._trainer.begin_step(epoch, overwrite=True) as writer:
            writer.write_trainer_state(flat)
            info = writer.commit(metadata={"epoch": int(epoch), "agent_step": int(agent_step)})
        self._trainer.apply_retention()
        return info

    def load_trainer_state(self) -> dict[str, Any] | None:
        """The latest saved trainer state (``optimizer_state``, ``epoch``, ``agent_step``...), or None."""
        latest = self._trainer.latest()
        if latest is None:
            return None
        return self._trainer.load_trainer_state(latest.step)

    # -- loading ------------------------------------------------------------------------------
    @staticmethod
    def normalize_uri(uri: str) -> str:
        """Paths become absolute ``file://`` URIs; ``:vN``/``:latest``/``:best`` selectors are kept."""
        return normalize_uri(uri)

    def _own_store(self, run_uri: str) -> Any:
        """This run's (tier-aware) store when ``run_uri`` names it on either tier, else None."""
        if any(run_uri == tier.uri for tier in self._tiers):
            return self.store
        return None

    def _concrete(self, uri: str) -> tuple[str, dict[str, Any], CheckpointStore | None, int | None]:
        """``(step URI, storage options, store, step)`` of the checkpoint a URI names right now."""
        parsed = parse_uri(uri)
        if parsed.kind in ("mock", "file"):
            return normalize_uri(uri), self.config.storage_options, None, parsed.step
        own = self._own_store(parsed.run_uri)
        if own is not None:
            # a step directory's selector is its step; none means the latest
            step = own.resolve("latest" if parsed.selector is None else parsed.selector)
            tier = own.store_for(step)
            return tier.step_uri(step), tier.config.storage_options, tier, step
        options = self.config.storage_options
        store = open_run(parsed, options)
        step = store.resolve(parsed.selector)
        return store.step_uri(step), options, store, step

    def load_from_uri(self, uri: str, device: str | torch.device = "cpu") -> Any:
        """Load a policy from file://, s3://, a path, ``<run>:latest``/``:best``/``:vN`` or mock:// (LRU cached).

        Returns the model built from the run's recorded architecture, on ``device``; the state
        dict when the run recorded none.
        """
        concrete, options, _, _ = self._concrete(uri)
        key = f"{concrete}@{torch.device(device)}"
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        artifact = load_artifact(concrete, storage_options=options)
        if artifact.architecture is not None:
            policy: Any = artifact.instantiate().to(device)
        else:
            policy = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in artifact.state_dict.items()}
        if self.cache_size > 0:
            self._cache[key] = policy
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return policy

    def load_agent(self, epoch: int | None = None, device: str | torch.device = "cpu") -> Any:
        """This run's agent at ``epoch`` (default: the latest)."""
        return self.load_from_uri(f"{self.run_uri}:{'latest' if epoch is None else f'v{epoch}'}", device)

    def get_policy_metadata(self, uri: str) -> dict[str, Any]:
        """``run_name``, ``epoch``, ``agent_step``, ``uri``, ``original_uri`` and the saved metadata of a policy URI."""
        normalized = normalize_uri(uri)
        concrete, _, store, step = self._concrete(uri)
        run_name, version = key_and_version(normalized)
        out: dict[str, Any] = {
            "run_name": run_name,
            "run": run_name,
            "epoch": version or 0,
            "uri": concrete,
            "original_uri": uri,
        }
        if store is not None and step is not None:
            info = store.info(step)
            for k, v in info.metadata.items():
                out.setdefault(k, v)
            out["epoch"] = step
            out["metrics"] = dict(info.metrics)
            out["durability"] = list(info.durability)
        return out

    def select_checkpoints(self, strategy: str = "latest", count: int = 1, metric: str = "epoch") -> list[str]:
        """URIs of this run's checkpoints, best by ``metric`` first (``epoch``: newest first)."""
        if strategy not in ("latest", "all"):
            raise ValueError(f"strategy: must be 'latest' or 'all', got {strategy!r}")
        infos = self.store.list()

        def key(info: CheckpointInfo) -> float:
            if metric == "epoch":
                return float(info.step)
            value = info.metrics.get(metric, info.metadata.get(metric))
            return float(value) if isinstance(value, (int, float)) else float("-inf")

        infos.sort(key=key, reverse=True)
        chosen = infos if strategy == "all" else infos[: max(0, count)]
        return [self.store.durable_uri(info.step) for info in chosen]

    def cleanup_old_checkpoints(self, keep_last_n: int = 5) -> int:
        """Delete all but the last ``keep_last_n`` local checkpoints (never the latest, leased or un-uploaded ones)."""
        pruner = CheckpointStore(
            config=self.local.config.replace(keep_last_n=keep_last_n, keep_top_k=None, keep_period=None)
        )
        protected = pruner.leased_steps() | self.store.not_uploaded_steps()
        deleted = pruner.apply_retention(protected)
        self.local.reload()
        return len(deleted)

    def clear_cache(self) -> None:
        """Forget every cached policy."""
        self._cache.clear()

    def _forget_cached(self, epoch: int) -> None:
        suffix = step_dir(epoch)
        for key in [k for k in self._cache if k.split("@", 1)[0].endswith(suffix)]:
            del self._cache[key]

    def wait_for_uploads(self) -> dict[int, str]:
        """Block until background uploads finish (``{}`` without a remote tier)."""
        return self.store.wait_for_uploads()

    def close(self) -> None:
        """Finish background uploads and release threads."""
        self.store.close()
