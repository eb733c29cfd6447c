"""``load_from_uri``: one checkpoint (a ray-ckpt step, a legacy file or a mock model) as an artifact.

Ray-ckpt runs are read through :class:`~ray_ckpt.core.store.CheckpointStore`, opened by
:func:`open_run` (the one way from a run URI to a store: the CLI, the loaders, the one-shot
functions and ``initialize_run_dir`` all use it); legacy files are read by :mod:`ray_ckpt.interop.legacy`
and turned into artifacts here (:func:`load_legacy`); ``mock://NAME`` builds a tiny deterministic
model for tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ckpt.core.architecture import Architecture
from ray_ckpt.core.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.core.uri import MOCK_SCHEME, ParsedURI, parse_uri
from ray_ckpt.interop import legacy

logger = logging.getLogger(__name__)

# Metadata key under which the manager records how its run ranks and keeps checkpoints, so that
# readers (``:best``, the CLI) rank and plan retention the way the writer did.
POLICY_KEY = "ray_ckpt.policy"
_POLICY_FIELDS = ("metric_name", "mode", "keep_top_k", "keep_last_n", "keep_period", "keep_checkpoints_without_metrics")


@dataclass
class CheckpointArtifact:
    """A loaded checkpoint: weights, the architecture that builds the model, metrics and state.

    ``instantiate()`` builds the model from the architecture and loads the weights; the model is
    built once and cached on the artifact.
    """

    state_dict: dict[str, Any]
    architecture: Architecture | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trainer_state: Any = None
    step: int | None = None
    run_name: str | None = None
    uri: str | None = None
    source_format: str = "ray-ckpt"
    metadata: dict[str, Any] = field(default_factory=dict)
    allowed_architecture_prefixes: list[str] | None = None
    _model: torch.nn.Module | None = field(default=None, repr=False)

    def instantiate(self, strict: bool = True) -> torch.nn.Module:
        """Build the model from ``architecture`` and load ``state_dict`` into it (cached).

        The class is checked against ``allowed_architecture_prefixes`` (None: the defaults plus
        the modules trusted in this process; see :mod:`ray_ckpt.core.architecture`) before anything
        is called.
        """
        if self._model is not None:
            return self._model
        if self.architecture is None:
            raise CheckpointNotFoundError(
                f"{self.uri or self.run_name}: no model_architecture.json recorded; cannot instantiate "
                "(load .state_dict into a model you build yourself)"
            )
        model = self.architecture.build(self.allowed_architecture_prefixes)
        load_tied(model, self.state_dict, strict=strict, where=self.uri or self.run_name or "checkpoint")
        self._model = model
        return model


def load_tied(model: torch.nn.Module, state_dict: dict[str, Any], *, strict: bool, where: str) -> None:
    """``model.load_state_dict`` that accepts missing keys of tied weights (as Hugging Face folders
    store them: ``lm_head.weight`` is ``transformer.wte.weight``); any other missing key under
    ``strict`` is an error as usual."""
    result = model.load_state_dict(state_dict, strict=False)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    if not strict:
        return
    own = model.state_dict(keep_vars=True)
    loaded = {own[k].data_ptr() for k in state_dict if k in own and isinstance(own[k], torch.Tensor)}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{where}: the checkpoint does not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )


def recorded_policy(store: CheckpointStore) -> dict[str, Any]:
    """The ranking/retention policy the run's writer recorded in its latest checkpoint ({} if none).

    Every commit marker records the writer's whole policy (the store's :meth:`policy`); runs
    written before markers did carry it in the manager's metadata.
    """
    latest = store.latest()
    if latest is None:
        return {}
    try:
        policy = store.read_manifest(latest.step).extra.get("policy")
    except (CheckpointNotFoundError, CorruptCheckpointError):
        policy = None
    if not isinstance(policy, dict):
        policy = (latest.metadata or {}).get(POLICY_KEY)
    if not isinstance(policy, dict):
        return {}
    return {k: policy[k] for k in _POLICY_FIELDS if k in policy}


def open_run(
    uri: str | os.PathLike[str] | ParsedURI,
    storage_options: dict[str, Any] | None = None,
    *,
    must_exist: bool = True,
    run_only: bool = False,
    **overrides: Any,
) -> CheckpointStore:
    """A CheckpointStore for a run URI, ranking as its writer recorded unless ``overrides`` say otherwise.

    The one opener of runs by URI. ``uri`` is ``<storage>/<run_name>`` (a path or any URI),
    optionally with a selector, or a step directory; ``run_only`` refuses both (a run
    directory is expected: the one-shot functions, ``initialize_run_dir``). The recorded
    policy (metric, mode, retention) is what the run's latest marker records; ``overrides``
    (None values ignored) replace it field by field. Raises CheckpointNotFoundError naming the
    URI when ``must_exist`` and there is no run there; ConfigError for a URI that is no run's.
    """
    parsed = uri if isinstance(uri, ParsedURI) else parse_uri(os.fspath(uri))
    if parsed.kind not in ("run", "step"):
        raise ConfigError(f"{parsed.location}: expected a run URI (<storage>/<run_name>), got a {parsed.kind}")
    if run_only and (parsed.kind != "run" or parsed.selector is not None):
        raise ConfigError(f"{parsed.location}: expected a run directory (<storage>/<run_name>), without a selector")
    options = {k: v for k, v in overrides.items() if v is not None}
    # The policy options are applied together with the recorded policy: keep_top_k alone is
    # only valid once the recorded metric_name joins it.
    store = CheckpointStore(
        parsed.storage_uri,
        parsed.run_name,
        storage_options or {},
        **{k: v for k, v in options.items() if k not in _POLICY_FIELDS},
    )
    if must_exist and not store.storage.exists(""):
        raise CheckpointNotFoundError(f"no run at {parsed.run_uri}")
    recorded = recorded_policy(store)
    if "metric_name" in options and recorded.get("metric_name") != options["metric_name"]:
        recorded.pop("mode", None)  # the recorded mode belongs to another metric
    policy = {**{k: v for k, v in recorded.items() if k not in options}, **options}
    policy = {k: v for k, v in policy.items() if k in _POLICY_FIELDS}
    if "keep_top_k" not in options and policy.get("keep_top_k") is not None and not policy.get("metric_name"):
        # Written before keep_top_k needed a metric: it ranked nothing, so it kept the latest
        # plus the other rules, which is what keep_last_n=0 keeps.
        policy["keep_last_n"] = policy.get("keep_last_n") or 0
        policy["keep_top_k"] = None
    if policy.get("keep_top_k") is None and "keep_checkpoints_without_metrics" not in options:
        policy.pop("keep_checkpoints_without_metrics", None)  # it only qualifies keep_top_k
    if policy:
        store.config = store.config.replace(**policy)
        store.index.metric_name = store.config.metric_name
        store.index.mode = store.config.mode
    return store


def load_from_uri(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    allowed_architecture_prefixes: list[str] | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> CheckpointArtifact:
    """Load the checkpoint a URI names: a ray-ckpt run (with selector), a step dir, a legacy file,
    a Hugging Face model folder or its ``*.safetensors.index.json`` (all shards, as one checkpoint), or mock://.

    One shard of a sharded set is refused (:class:`~ray_ckpt.interop.legacy.PartialCheckpointError`
    naming the index to load instead).

    ``metric``/``mode`` rank ``:best`` when the run recorded no ranking of its own. Pickled
    legacy files load only with ``trust_pickle=True`` (unpickling runs arbitrary code).
    A configured ``allowed_architecture_prefixes`` list refuses an architecture outside it here,
    before the weights are read; with None (the defaults plus the modules trusted in this
    process) the weights stay loadable and ``instantiate()`` refuses.
    """
    parsed = parse_uri(uri)
    if parsed.kind == "mock":
        return _mock_artifact(parsed)
    if parsed.kind == "file":
        return load_legacy(
            parsed.location,
            storage_options=storage_options,
            trust_pickle=trust_pickle,
            allowed_architecture_prefixes=allowed_architecture_prefixes,
        )
    store = open_run(parsed, storage_options, must_exist=False, metric_name=metric, mode=mode)
    if parsed.kind == "run" and not store.list():
        found = legacy.find_metta_checkpoint(parsed, storage_options=storage_options)
        if found is not None:
            return load_legacy(
                found,
                storage_options=storage_options,
                trust_pickle=trust_pickle,
                allowed_architecture_prefixes=allowed_architecture_prefixes,
            )
        if legacy.find_hf_folder(parsed.location, storage_options=storage_options) is not None:
            if parsed.selector not in (None, "latest"):
                raise ConfigError(f"{uri!r}: a Hugging Face model folder holds one checkpoint; it takes no selector")
            return load_legacy(
                parsed.location,
                storage_options=storage_options,
                allowed_architecture_prefixes=allowed_architecture_prefixes,
            )
        if not store.storage.exists(""):
            raise CheckpointNotFoundError(f"no run at {parsed.run_uri}")
    if allowed_architecture_prefixes is not None:
        store.config = store.config.replace(allowed_architecture_prefixes=allowed_architecture_prefixes)
    step = store.resolve(parsed.selector)
    info = store.info(step)
    try:
        architecture: Architecture | None = store.read_architecture()
    except FileNotFoundError:
        architecture = None
    if architecture is not None and store.config.allowed_architecture_prefixes is not None:
        architecture.check_allowed(store.config.allowed_architecture_prefixes)
    return CheckpointArtifact(
        state_dict=store.load(step),
        architecture=architecture,
        metrics=dict(info.metrics),
        trainer_state=store.load_trainer_state(step),
        step=step,
        run_name=store.run_name,
        uri=info.uri,
        source_format="ray-ckpt",
        metadata=dict(info.metadata),
        allowed_architecture_prefixes=store.config.allowed_architecture_prefixes,
    )


def load_legacy(
    location: str,
    *,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    allowed_architecture_prefixes: list[str] | None = None,
) -> CheckpointArtifact:
    """A legacy checkpoint file (see :mod:`ray_ckpt.interop.legacy`) as a :class:`CheckpointArtifact`.

    A configured ``allowed_architecture_prefixes`` list refuses here a pickled model whose class
    is outside it, as :func:`load_from_uri` does for runs.
    """
    ckpt = legacy.read_legacy(location, storage_options=storage_options, trust_pickle=trust_pickle)
    if ckpt.architecture is not None and allowed_architecture_prefixes is not None:
        ckpt.architecture.check_allowed(allowed_architecture_prefixes)
    return CheckpointArtifact(
        state_dict=ckpt.state_dict,
        architecture=ckpt.architecture,
        metrics=ckpt.metrics,
        trainer_state=ckpt.trainer_state,
        step=ckpt.step,
        run_name=ckpt.run_name,
        uri=ckpt.location,
        source_format=ckpt.format,
        metadata=ckpt.metadata,
        allowed_architecture_prefixes=allowed_architecture_prefixes,
        _model=ckpt.model,
    )


def _mock_artifact(parsed: ParsedURI) -> CheckpointArtifact:
    from ray_ckpt.interop.mock import MOCK_CONFIG, TinyPolicy, mock_state_dict  # defines a torch module

    step = parsed.step if parsed.step is not None else 0
    return CheckpointArtifact(
        state_dict=mock_state_dict(parsed.run_name),
        architecture=Architecture.describe(TinyPolicy, dict(MOCK_CONFIG)),  # our own class: trusted
        metrics={},
        step=step,
        run_name=parsed.run_name,
        uri=f"{MOCK_SCHEME}://{parsed.run_name}:v{step}",
        source_format="mock",
    )
