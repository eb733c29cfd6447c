"""Validated checkpoint options, grouped by the part of ray-ckpt that consumes them; YAML loading.

:class:`CheckpointConfig` is a pydantic model of six groups (``store``, ``retention``,
``schedule``, ``checkpointer``, ``tiering``, ``memory``). pydantic (a declared dependency) reports
every invalid field of a config at once, validates assignments and exports a JSON schema. Every
option can still be given and read flat (``CheckpointConfig(keep_last_n=3).keep_last_n``); the
groups say which entry point reads what (each entry point registers it: :func:`register_consumer`),
so that a field set where the entry point ignores it is an error instead of a silent no-op. No I/O
beyond reading the YAML.

Only ray-ckpt's own field names are known here. Another framework's names for them (NeMo RL's
``checkpoint_dir``, Ray Train's ``num_to_keep``) live with that framework's adapter, which
registers them (:class:`FieldAliases`, :func:`register_aliases`); ``import ray_ckpt`` registers
the ones ray-ckpt ships.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ray_ckpt.core.errors import ConfigError
from ray_ckpt.core.safejson import MAX_DEPTH
from ray_ckpt.core.uri import validate_run_name

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

Problem = tuple[str, str]  # (field, what is wrong with it)


class FieldAliases:
    """Another framework's names for some config fields (flat keys only), as its adapter defines them.

    Registered with :func:`register_aliases`, the names are accepted wherever a config is built
    (keyword arguments, ``from_dict``, YAML, ``replace``): each sets the fields :meth:`translate`
    gives, and errors name the alias (``... (given as checkpoint_dir)``).
    """

    framework: str = ""
    keys: tuple[str, ...] = ()

    def translate(self, key: str, value: Any, data: Mapping[str, Any]) -> list[tuple[str, Any]] | str:
        """The ``(field, value)`` pairs ``key=value`` sets (``data``: every option given with it), or
        what is wrong with the value."""
        raise NotImplementedError

    def targets(self, key: str) -> set[str]:
        """The fields ``key`` may set (what ``check_consumed(among=...)`` checks for it)."""
        raise NotImplementedError

    def implied(self, data: Mapping[str, Any], given: Collection[str]) -> list[tuple[str, Any, str]]:
        """``(field, value, shown as)`` for what the framework implies when ``data`` uses its names and
        ``given`` (the fields set so far) lacks it (Ray: a score attribute ranks by "max")."""
        return []


_ALIASES: dict[str, FieldAliases] = {}  # alias key -> the aliases that define it


def register_aliases(aliases: FieldAliases) -> None:
    """Accept ``aliases.keys`` in every config from now on; ValueError for a key that names a field,
    a group or another framework's alias."""
    for key in aliases.keys:
        owner = _ALIASES.get(key)
        if key in FIELD_GROUPS or key in GROUPS or (owner is not None and owner is not aliases):
            raise ValueError(f"{aliases.framework} alias {key!r}: already names a field, a group or another alias")
    for key in aliases.keys:
        _ALIASES[key] = aliases


def _size_problem(value: Any) -> tuple[int | None, str | None]:
    """``(bytes, None)`` for a valid size, ``(None, problem)`` otherwise."""
    if isinstance(value, bool):
        return None, f"expected a byte count or a size like '5GB', got {value!r}"
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            return None, f"cannot parse size {value!r} (use e.g. 5GB, 500MB, 1GiB)"
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    else:
        return None, f"expected int or str, got {type(value).__name__}"
    if size <= 0:
        return None, f"must be positive, got {value!r}"
    return size, None


def parse_size(value: int | str, *, field_name: str = "size") -> int:
    """Parse ``5GB`` / ``500MiB`` / ``1024`` into bytes (GB = 10**9, as Hugging Face does)."""
    size, problem = _size_problem(value)
    if problem is not None or size is None:
        raise ConfigError(f"{field_name}: {problem}")
    return size


def _bytes(value: Any) -> Any:
    size, problem = _size_problem(value)
    if problem is not None:
        raise PydanticCustomError("size", "{problem}", {"problem": problem})
    return size


def _run_name(value: str) -> str:
    try:
        return validate_run_name(value, field_name="run_name")
    except ConfigError as exc:
        raise PydanticCustomError("run_name", "{problem}", {"problem": _strip_field(str(exc), "run_name")}) from None


def _not_empty(value: str) -> str:
    if not value:
        raise PydanticCustomError("empty", "must not be empty")
    return value


def _prefix_list(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        raise PydanticCustomError(
            "prefixes", "must be a list of non-empty strings, got {value}", {"value": repr(value)}
        )
    if isinstance(value, (tuple, list)):
        return list(value)
    return value


def _mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if value is not None:
        raise PydanticCustomError("mapping", "must be a mapping, got {kind}", {"kind": type(value).__name__})
    return value


def _rule(problems: list[Problem]) -> PydanticCustomError:
    """A cross-field error; ``problems`` travel in the context so each names its own field."""
    text = "; ".join(f"{f}: {p}" for f, p in problems)
    return PydanticCustomError("config_rule", "{text}", {"text": text, "problems": tuple(problems)})


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _bytes_or_off(value: Any) -> Any:
    """A size, or 0/None where the field allows 'off'."""
    return value if value is None or value == 0 and not isinstance(value, bool) else _bytes(value)


ByteSize = Annotated[int, BeforeValidator(_bytes_or_off, json_schema_input_type=int | str)]
Options = Annotated[dict[str, Any], BeforeValidator(_mapping, json_schema_input_type=dict[str, Any])]


class OptionGroup(BaseModel):
    """One group of :class:`CheckpointConfig` options: strict types, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    group: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
            return
        if name not in type(self).model_fields:
            raise _config_error([(name, _unknown(name, list(type(self).model_fields), f"field of {self.group}"))])
        # pydantic applies the value before the model's cross-field rules run; undo it on failure.
        saved = self.__dict__.copy()
        fields_set = set(self.__pydantic_fields_set__)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            object.__setattr__(self, "__dict__", saved)
            object.__setattr__(self, "__pydantic_fields_set__", fields_set)
            raise _config_error(_problems(exc, group=self.group)) from None


class StoreOptions(OptionGroup):
    """Where checkpoints live and how their files are written and read (every entry point)."""

    group: ClassVar[str] = "store"

    storage_uri: Annotated[str, AfterValidator(_not_empty)] = Field(
        "./checkpoints",
        description="Storage root: a local directory, file://..., s3://bucket/prefix or memory:// (one process only).",
    )
    run_name: Annotated[str, AfterValidator(_run_name)] = Field(
        "run", description="The run's directory under storage_uri: one safe path component."
    )
    storage_options: Options = Field(
        default_factory=dict, description="fsspec options for storage_uri (e.g. the S3 endpoint and credentials)."
    )
    max_shard_size: Annotated[int, BeforeValidator(_bytes, json_schema_input_type=int | str)] = Field(
        "5GB",
        validate_default=True,
        description="Largest safetensors shard: bytes or a size like '5GB', '500MB', '1GiB' (GB = 10**9); "
        "read back as bytes.",
    )
    checkpoint_format: Literal["safetensors", "pt"] = Field(
        "safetensors", description="File format of the tensor shards."
    )
    verify_on_load: bool = Field(
        True,
        description=(
            "Check every byte a load returns (into= and ranged reads included) against the xxh3 digests "
            "recorded when it was written. False is the explicit way to skip the check: damaged bytes are "
            "then returned without an error."
        ),
    )
    direct_io: bool = Field(
        True,
        description="Write big shards on a local disk with O_DIRECT (faster durable saves; the files are then "
        "not in the page cache). False writes through the page cache.",
    )
    leftover_grace_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        3600.0,
        description="A writer's first save removes step directories without a marker (a crashed save's "
        "leftovers) once nothing in them changed for this many seconds; younger ones may be a save in flight.",
    )
    allowed_architecture_prefixes: Annotated[
        list[Annotated[str, Field(min_length=1)]] | None, BeforeValidator(_prefix_list)
    ] = Field(
        None,
        description="Which modules model_architecture.json may name (the file is data, never a code path). "
        "None: torch.nn, transformers and the modules of live classes this process described. A list: exactly "
        "those prefixes, matched on whole dotted components (an explicit opt-in).",
    )
    max_pending_saves: Annotated[int, Field(ge=1)] = Field(
        2,
        description="Asynchronous saves in flight before the next one blocks (CheckpointStore.save_async, the "
        "manager's async saves, each WorkerClient and the checkpointer): bounds snapshot memory.",
    )


class RetentionOptions(OptionGroup):
    """How checkpoints are ranked and which ones are kept (every entry point that commits or ranks)."""

    group: ClassVar[str] = "retention"

    metric_name: str | None = Field(
        None, description="The metric checkpoints are ranked by (e.g. 'eval/return'); None ranks nothing."
    )
    mode: Literal["max", "min"] = Field(
        "min", description="Whether a higher ('max') or lower ('min') metric is better."
    )
    keep_top_k: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Keep the k best checkpoints by metric_name (needs metric_name)."
    )
    keep_last_n: Annotated[int, Field(ge=0)] | None = Field(None, description="Keep the n newest checkpoints.")
    keep_period: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Also keep every step divisible by this (never deletes anything by itself)."
    )
    keep_checkpoints_without_metrics: bool = Field(
        False,
        description="For keep_top_k, as Orbax's option of the same name (whose default is True; ours is False, "
        "see docs/RETENTION.md): True also keeps every step without a finite value of metric_name (its score may "
        "not have arrived yet); False (the default) leaves such steps to the other rules (keep_last_n, "
        "keep_period, leases, the latest). Setting True needs keep_top_k.",
    )

    @model_validator(mode="after")
    def _rules(self) -> RetentionOptions:
        problems: list[Problem] = []
        if self.keep_top_k is not None and not self.metric_name:
            problems.append(
                (
                    "keep_top_k",
                    "set without metric_name, so no step is ever best "
                    "(set metric_name, or use keep_last_n to keep the newest)",
                )
            )
        if self.keep_checkpoints_without_metrics and self.keep_top_k is None:
            problems.append(
                (
                    "keep_checkpoints_without_metrics",
                    "True only changes what keep_top_k keeps; set keep_top_k (and metric_name) or leave it out",
                )
            )
        if problems:
            raise _rule(problems)
        return self


class ScheduleOptions(OptionGroup):
    """When and how a training loop saves: read by the managers and by loops that drive the checkpointer."""

    group: ClassVar[str] = "schedule"

    save_interval_steps: Annotated[int, Field(ge=1)] = Field(
        1,
        description="Save every this many steps (CheckpointManager, NeMoCheckpointManager.should_save, and "
        "training loops that read it, as the demo does).",
    )
    async_save: bool = Field(
        False,
        description="CheckpointManager only: save on a background thread (WorkerClient uses save(blocking=False)).",
    )
    enabled: bool = Field(
        True, description="NeMo RL's 'enabled': whether the trainer checkpoints at all (NeMoCheckpointManager)."
    )


class CheckpointerOptions(OptionGroup):
    """The checkpointer actor (start_checkpointer) and its clients (WorkerClient, EvalClient)."""

    group: ClassVar[str] = "checkpointer"

    write_mode: Literal["gather", "direct"] = Field(
        "gather",
        description="'gather': ranks hand their tensors to the master, which writes them; 'direct': every rank "
        "writes its own shards and the master commits.",
    )
    save_timeout_s: Seconds = Field(
        300.0,
        description="Seconds a step may take, from the first rank's report to its commit, before it is aborted "
        "(nothing committed).",
    )
    lease_ttl_s: Seconds = Field(600.0, description="Default lifetime of an EvalClient lease, in seconds.")
    max_restarts: Annotated[int, Field(ge=-1)] = Field(
        3, description="Times Ray restarts the checkpointer actor (-1: forever); it rebuilds its index from storage."
    )


class TieringOptions(OptionGroup):
    """Tiered saves: a local commit first, then a background upload to remote_uri."""

    group: ClassVar[str] = "tiering"

    remote_uri: str | None = Field(None, description="Remote prefix the local checkpoints are uploaded to.")
    remote_storage_options: Annotated[
        dict[str, Any] | None, BeforeValidator(_mapping, json_schema_input_type=dict[str, Any] | None)
    ] = Field(None, description="fsspec options for remote_uri; None uses storage_options. Needs remote_uri.")

    @model_validator(mode="after")
    def _rules(self) -> TieringOptions:
        if self.remote_storage_options is not None and not self.remote_uri:
            raise _rule([("remote_storage_options", "set without remote_uri (nothing would use it)")])
        return self


class MemoryOptions(OptionGroup):
    """The memory tier: every save committed in holders' memory on the training nodes, some persisted.

    Off by default (``memory_replicas=0``). See docs/MEMORY.md.
    """

    group: ClassVar[str] = "memory"

    memory_replicas: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Copies of every rank's state on other training nodes besides the rank's own node's holder "
        "(0: the memory tier is off; 1 or more: every save commits in memory first).",
    )
    memory_keep_last: Annotated[int, Field(ge=1)] = Field(
        2, description="Committed memory steps kept in the holders; older ones are freed at once."
    )
    persist_interval_steps: Annotated[int, Field(ge=1)] = Field(
        1,
        description="Every step with step % persist_interval_steps == 0 is also persisted to storage (and through "
        "tiering to the remote) in the background, from memory; save(persist=True) forces it.",
    )
    memory_budget_bytes: Annotated[
        int | None, BeforeValidator(_bytes_or_off, json_schema_input_type=int | str | None)
    ] = Field(
        None,
        description="Bytes one node's holder may hold (memory steps, replicas and the eval cache); a save that "
        "would exceed it waits up to save_timeout_s, then fails. None: half of the node's object store.",
    )
    eval_cache_bytes: ByteSize = Field(
        0,
        description="Bytes of persisted steps a node's holder keeps for the evaluators on its node (LRU); "
        "0: evaluators read storage themselves.",
    )


GROUPS: dict[str, type[OptionGroup]] = {
    "store": StoreOptions,
    "retention": RetentionOptions,
    "schedule": ScheduleOptions,
    "checkpointer": CheckpointerOptions,
    "tiering": TieringOptions,
    "memory": MemoryOptions,
}
# flat field name -> its group
FIELD_GROUPS: dict[str, str] = {name: group for group, model in GROUPS.items() for name in model.model_fields}

# Which options each entry point reads: group names, or single fields of a group it reads only in
# part. A non-default value outside these is an error there (``check_consumed``). Empty here: each
# entry point registers its own entry where it is defined (:func:`register_consumer`).
CONSUMERS: dict[str, frozenset[str]] = {}


def register_consumer(name: str, reads: Iterable[str]) -> None:
    """Declare what entry point ``name`` reads (group names, or single fields of a group it reads in
    part), for ``check_consumed(by=name)`` and the "read by" part of its errors.

    Called by the module that defines the entry point, when it is imported. ValueError for an
    unknown group or field, or for a name already registered with other reads.
    """
    wanted = frozenset(reads)
    unknown = wanted - set(GROUPS) - set(FIELD_GROUPS)
    if unknown:
        raise ValueError(f"consumer {name!r}: unknown groups or fields {sorted(unknown)}")
    if CONSUMERS.get(name, wanted) != wanted:
        raise ValueError(f"consumer {name!r}: already registered, reading {sorted(CONSUMERS[name])}")
    CONSUMERS[name] = wanted


class CheckpointConfig(BaseModel):
    """Options of one run, in six groups; each group is read by the entry points named here.

    * ``store`` (every entry point): storage_uri, run_name, storage_options, max_shard_size,
      checkpoint_format, verify_on_load, direct_io, leftover_grace_s,
      allowed_architecture_prefixes, max_pending_saves.
    * ``retention`` (every entry point): metric_name, mode, keep_top_k, keep_last_n,
      keep_period, keep_checkpoints_without_metrics.
    * ``schedule``: save_interval_steps (the managers, and a training loop that drives the
      checkpointer, as the demo does), async_save (CheckpointManager only), enabled
      (NeMoCheckpointManager only).
    * ``checkpointer`` (start_checkpointer and its clients, WorkerClient and EvalClient, which
      receive the checkpointer's config): write_mode, save_timeout_s, lease_ttl_s, max_restarts.
    * ``tiering`` (TieredCheckpointStore, the NeMo/Metta managers, start_checkpointer):
      remote_uri, remote_storage_options.
    * ``memory`` (start_checkpointer and its clients): memory_replicas, memory_keep_last,
      persist_interval_steps, memory_budget_bytes, eval_cache_bytes (docs/MEMORY.md).

    Each entry point registers what it reads (:func:`register_consumer`, collected in
    :data:`CONSUMERS`) for :meth:`check_consumed`.

    Build it flat (``CheckpointConfig(storage_uri=..., metric_name="loss", keep_top_k=3)``), grouped
    (``CheckpointConfig(retention={"keep_top_k": 3, "metric_name": "loss"})``) or both; read it
    flat (``cfg.keep_top_k``, ``cfg.max_shard_size`` in bytes) or grouped (``cfg.retention``).
    Every invalid field is reported at once in one :class:`ConfigError` naming each field;
    unknown keys get a did-you-mean; assignments (``cfg.keep_top_k = 2``) are validated the same
    way. Entry points call :meth:`check_consumed`, so that a field set to a non-default value
    where the entry point ignores it (``async_save`` for the checkpointer, ``write_mode`` for the
    manager) is an error naming the field and the entry point. ``json_schema()`` describes the
    grouped form. It pickles (the checkpointer ships it to its actors).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    store: StoreOptions = Field(default_factory=StoreOptions, description=StoreOptions.__doc__)
    retention: RetentionOptions = Field(default_factory=RetentionOptions, description=RetentionOptions.__doc__)
    schedule: ScheduleOptions = Field(default_factory=ScheduleOptions, description=ScheduleOptions.__doc__)
    checkpointer: CheckpointerOptions = Field(
        default_factory=CheckpointerOptions, description=CheckpointerOptions.__doc__
    )
    tiering: TieringOptions = Field(default_factory=TieringOptions, description=TieringOptions.__doc__)
    memory: MemoryOptions = Field(default_factory=MemoryOptions, description=MemoryOptions.__doc__)

    def __init__(self, /, **data: Any) -> None:
        self._build(*_regroup(data))

    def _build(self, grouped: dict[str, dict[str, Any]], problems: list[Problem], sources: dict[str, str]) -> None:
        """Validate the grouped options; raise one ConfigError with every problem, found here or before."""
        try:
            super().__init__(**grouped)
        except ValidationError as exc:
            problems = problems + _problems(exc, sources=sources)
        if problems:
            raise _config_error(problems)

    @classmethod
    def _from_groups(
        cls, grouped: dict[str, dict[str, Any]], problems: list[Problem], sources: dict[str, str]
    ) -> CheckpointConfig:
        config = cls.__new__(cls)
        config._build(grouped, problems, sources)
        return config

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        elif name in FIELD_GROUPS:
            setattr(getattr(self, FIELD_GROUPS[name]), name, value)  # the group validates it
        elif name in GROUPS:
            grouped, problems, sources = _regroup({name: value})
            try:
                options = GROUPS[name](**grouped[name])
            except ValidationError as exc:
                problems = problems + _problems(exc, group=name, sources=sources)
            if problems:
                raise _config_error(problems)
            super().__setattr__(name, options)
        else:
            raise _config_error([(name, _unknown(name, _known_keys()))])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name.startswith("_"):
                raise
            close = difflib.get_close_matches(name, _known_keys(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"{type(self).__name__!r} has no option {name!r}{hint}") from None

    # -- views ---------------------------------------------------------------------------------
    @property
    def remote_checkpoints_enabled(self) -> bool:
        """Whether a remote tier is configured for background uploads."""
        return bool(self.tiering.remote_uri)

    def to_dict(self) -> dict[str, Any]:
        """Flat plain data (JSON/YAML serialisable): ``{field: value}``; ``from_dict`` reads it back."""
        flat: dict[str, Any] = {}
        for group in GROUPS:
            flat.update(getattr(self, group).model_dump())
        return flat

    def to_grouped_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data by group: ``{"store": {...}, "retention": {...}, ...}`` (the YAML group form)."""
        return {group: getattr(self, group).model_dump() for group in GROUPS}

    def non_default_fields(self) -> dict[str, Any]:
        """The fields whose value differs from the default, flat: ``{field: value}``."""
        defaults = _defaults()
        return {k: v for k, v in self.to_dict().items() if not _same(v, defaults[k])}

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointConfig:
        """Build from a mapping of flat fields, group sections or both; registered aliases accepted."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
        return cls._from_groups(*_regroup(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> CheckpointConfig:
        """Load a YAML file; the options (flat, grouped or both) may sit at the top level or under ``checkpoint:``."""
        import yaml

        try:
            data = load_yaml(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file: {exc}") from exc
        if isinstance(data, dict) and "checkpoint" in data:
            data = data["checkpoint"]
            if data is not None and not isinstance(data, dict):
                raise ConfigError(f"{path}: checkpoint: expected a mapping of options, got {type(data).__name__}")
        try:
            return cls.from_dict(data or {})
        except ConfigError as exc:
            raise _config_error(getattr(exc, "problems", []), context=str(path), fallback=str(exc)) from exc

    def replace(self, **changes: Any) -> CheckpointConfig:
        """A validated copy with some fields changed (flat names, or group mappings merged into the group)."""
        grouped, problems, sources = _regroup(changes)
        merged = self.to_grouped_dict()
        for group, values in grouped.items():
            merged[group].update(values)
        return self._from_groups(merged, problems, sources)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON schema of the grouped form (each field with its type, default and description)."""
        return cls.model_json_schema()

    # -- which entry point reads what ----------------------------------------------------------
    def unused_fields(self, consumed: Iterable[str]) -> list[str]:
        """Fields set to a non-default value outside ``consumed`` (group names or field names)."""
        wanted = set(consumed)
        unknown = wanted - set(GROUPS) - set(FIELD_GROUPS)
        if unknown:
            raise ValueError(f"consumed: unknown groups or fields {sorted(unknown)}")
        return [f for f in self.non_default_fields() if f not in wanted and FIELD_GROUPS[f] not in wanted]

    def check_consumed(
        self,
        by: str,
        consumed: Iterable[str] | None = None,
        *,
        among: Iterable[str] | None = None,
        replaced: Mapping[str, tuple[Any, str]] | None = None,
    ) -> None:
        """Raise one ConfigError naming every field ``by`` would ignore.

        ``consumed`` defaults to ``CONSUMERS[by]``. ``among`` limits the check to some fields
        (e.g. the keyword options a caller passed). ``replaced`` maps a field the entry point sets
        itself to ``(the value it uses, the argument it comes from)``: a non-default config value
        that differs is ignored too.
        """
        if consumed is None:
            if by not in CONSUMERS:
                raise ValueError(f"by: no consumer named {by!r} (known: {', '.join(sorted(CONSUMERS))})")
            consumed = CONSUMERS[by]
        unused = self.unused_fields(consumed)
        if among is not None:
            limit = {target for f in among for target in _alias_targets(f)}
            unused = [f for f in unused if f in limit]
        problems: list[Problem] = []
        for name in unused:
            readers = [c for c, reads in CONSUMERS.items() if name in reads or FIELD_GROUPS[name] in reads]
            where = f"read by {', '.join(readers)}" if readers else "read by no entry point imported so far"
            problems.append(
                (
                    name,
                    f"set to {_shown(name, getattr(self, name))}, but {by} ignores it ({where}); "
                    "remove it from this config",
                )
            )
        changed = self.non_default_fields()
        for name, (value, argument) in (replaced or {}).items():
            if name in changed and not _same(changed[name], value):
                problems.append(
                    (
                        name,
                        f"set to {_shown(name, changed[name])}, but {by} takes it from its argument {argument} "
                        f"({_shown(name, value)}); pass it there",
                    )
                )
        if problems:
            raise _config_error(problems)


def _flat_property(group: str, name: str) -> property:
    model = GROUPS[group]

    def get(self: CheckpointConfig) -> Any:
        return getattr(getattr(self, group), name)

    def set_(self: CheckpointConfig, value: Any) -> None:
        setattr(getattr(self, group), name, value)

    get.__annotations__["return"] = model.model_fields[name].annotation
    return property(get, set_, doc=f"``{group}.{name}``: {model.model_fields[name].description}")


for _name, _group in FIELD_GROUPS.items():
    setattr(CheckpointConfig, _name, _flat_property(_group, _name))
del _name, _group


def retention_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The retention fields (flat, validated) that a mapping of retention options sets; its keys may be
    fields or registered aliases. One ConfigError names every bad option, and any that is no
    retention option."""
    grouped, problems, sources = _regroup(data)
    for group, values in grouped.items():
        if group != "retention":
            problems += [(sources.get(name, name), "not a retention option") for name in values]
    try:
        options = RetentionOptions(**grouped["retention"])
    except ValidationError as exc:
        raise _config_error(problems + _problems(exc, group="retention", sources=sources)) from None
    if problems:
        raise _config_error(problems)
    return {name: getattr(options, name) for name in grouped["retention"]}


# -- helpers -----------------------------------------------------------------------------------
def _known_keys() -> list[str]:
    return [*FIELD_GROUPS, *GROUPS, *_ALIASES]


def _alias_targets(key: str) -> set[str]:
    """The fields a key may set (a field itself; an alias the fields its framework says)."""
    return _ALIASES[key].targets(key) if key in _ALIASES else {key}


def _unknown(key: str, candidates: list[str], what: str = "config field") -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    if close:
        return f"unknown {what}; did you mean {close[0]}?"
    return f"unknown {what} (known: {', '.join(sorted(candidates))})"


def _shown(name: str, value: Any) -> str:
    """A value for a message; storage options (they may hold credentials) only by their keys."""
    if name.endswith("storage_options") and isinstance(value, Mapping):
        return f"<options with keys {sorted(map(str, value))}>"
    return repr(value)


def _strip_field(text: str, name: str) -> str:
    return text[len(name) + 2 :] if text.startswith(f"{name}: ") else text


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an option value whose == misbehaves (an array in storage_options) counts as different
        return False


_DEFAULTS: dict[str, Any] = {}


def _defaults() -> dict[str, Any]:
    if not _DEFAULTS:
        _DEFAULTS.update(CheckpointConfig().to_dict())
    return _DEFAULTS


def _regroup(data: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Problem], dict[str, str]]:
    """Sort flat keys, aliases and group sections into ``{group: {field: value}}``.

    Returns the groups, the problems found (unknown keys, conflicting duplicates, misplaced
    fields) and, per field, the key that set it when that was not the field's own name.
    """
    grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    given_as: dict[str, tuple[str, Any]] = {}  # field -> (the key that set it, the value as given)
    problems: list[Problem] = []

    def put(name: str, value: Any, key: str, shown: Any) -> None:
        group = FIELD_GROUPS[name]
        if name in grouped[group] and not _same(grouped[group][name], value):
            first_key, first_shown = given_as[name]
            problems.append(
                (
                    name,
                    f"given twice, as {first_key}={_shown(name, first_shown)} and {key}={_shown(name, shown)}; "
                    "give only one",
                )
            )
            return
        grouped[group][name] = value
        given_as.setdefault(name, (key, shown))

    for key, value in data.items():
        if not isinstance(key, str):
            problems.append((repr(key), "option names must be strings"))
        elif key in GROUPS:
            model = GROUPS[key]
            if isinstance(value, OptionGroup):
                if not isinstance(value, model):
                    problems.append((key, f"expected {model.__name__} or a mapping, got {type(value).__name__}"))
                    continue
                value = value.model_dump()
            if value is None:
                continue  # an empty YAML section
            if not isinstance(value, Mapping):
                problems.append((key, f"expected a mapping of {key} options, got {type(value).__name__}"))
                continue
            for sub, sub_value in value.items():
                qualified = f"{key}.{sub}"
                if sub in model.model_fields:
                    put(sub, sub_value, qualified, sub_value)
                elif isinstance(sub, str) and sub in FIELD_GROUPS:
                    problems.append((qualified, f"{sub} belongs to the {FIELD_GROUPS[sub]} group, not {key}"))
                else:
                    problems.append((qualified, _unknown(str(sub), list(model.model_fields), f"{key} option")))
        elif key in _ALIASES:
            translated = _ALIASES[key].translate(key, value, data)
            if isinstance(translated, str):
                problems.append((key, translated))
            for name, field_value in [] if isinstance(translated, str) else translated:
                put(name, field_value, key, value)
        elif key in FIELD_GROUPS:
            put(key, value, key, value)
        else:
            problems.append((key, _unknown(key, _known_keys())))
    for aliases in dict.fromkeys(_ALIASES.values()):  # each framework once, in registration order
        for name, value, shown_as in aliases.implied(data, given_as):
            put(name, value, shown_as, value)
    sources = {name: key for name, (key, _) in given_as.items() if key not in (name, f"{FIELD_GROUPS[name]}.{name}")}
    return grouped, problems, sources


_SHOULD = re.compile(r"^(Input|String|Value|List|Dictionary|Object) should ")


def _problems(
    exc: ValidationError, *, group: str | None = None, sources: Mapping[str, str] | None = None
) -> list[Problem]:
    """One ``(field, problem)`` per pydantic error; ``group`` when ``exc`` came from one group model."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if group is not None:
            loc = (group, *loc)
        ctx = err.get("ctx") or {}
        if "problems" in ctx:
            problems.extend(tuple(p) for p in ctx["problems"])
            continue
        if len(loc) < 2:
            field, rest = str(loc[0]) if loc else "config", ()
        else:
            field, rest = str(loc[1]), loc[2:]
        if err["type"] == "value_error" and "error" in ctx:
            text = _strip_field(str(ctx["error"]), field)
        else:
            text = _SHOULD.sub("must ", err["msg"])
            if err["type"] not in ("size", "run_name", "empty", "prefixes", "mapping", "config_rule"):
                text = f"{text}, got {err['input']!r}"
        if rest:
            text = f"item {'.'.join(str(p) for p in rest)}: {text}"
        if sources and field in sources:
            text = f"{text} (given as {sources[field]})"
        problems.append((field, text))
    return problems


def _config_error(problems: list[Problem], *, context: str | None = None, fallback: str | None = None) -> ConfigError:
    """One ConfigError listing every problem (``.problems`` keeps them as ``(field, problem)``)."""
    if problems:
        lines = [f"{field}: {problem}" for field, problem in problems]
        text = lines[0] if len(lines) == 1 else f"{len(lines)} configuration errors:\n  " + "\n  ".join(lines)
    else:
        text = fallback or "invalid configuration"
    error = ConfigError(f"{context}: {text}" if context else text)
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


MAX_YAML_DEPTH = MAX_DEPTH  # the nesting every reader of ray-ckpt's files allows (safejson)


def load_yaml(text: str) -> Any:
    """Parse a config's YAML with limits: no aliases, nesting at most ``MAX_YAML_DEPTH`` deep.

    PyYAML's safe loader expands aliases (a kilobyte "billion laughs" bomb takes minutes and
    gigabytes; a self-referencing one yields a cyclic value that later recurses) and composes
    nodes recursively (a document 20,000 levels deep is a bare RecursionError). A config needs
    neither, so an alias and too deep a nesting are a ``yaml.YAMLError`` pointing at the line;
    :meth:`CheckpointConfig.from_yaml` names the file.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None, None, f"aliases (*{event.anchor}) are not allowed in a ray-ckpt config", event.start_mark
                )
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise yaml.composer.ComposerError(
                        None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
