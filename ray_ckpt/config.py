"""Validated checkpoint options (one dataclass) and YAML loading; no I/O beyond reading the YAML."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ckpt.errors import ConfigError

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

# NeMo RL style names accepted as aliases of our own fields.
_ALIASES = {
    "checkpoint_dir": "storage_uri",
    "save_period": "save_interval_steps",
}


def parse_size(value: int | str, *, field_name: str = "size") -> int:
    """Parse ``5GB`` / ``500MiB`` / ``1024`` into bytes (GB = 10**9, as Hugging Face does)."""
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a byte count or a size like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{field_name}: cannot parse size {value!r} (use e.g. 5GB, 500MB, 1GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    else:
        raise ConfigError(f"{field_name}: expected int or str, got {type(value).__name__}")
    if size <= 0:
        raise ConfigError(f"{field_name}: must be positive, got {value!r}")
    return size


@dataclass
class CheckpointConfig:
    """Options of one run: where it is stored, how checkpoints are ranked, kept and written.

    Every field is validated on construction; errors name the field.
    """

    storage_uri: str = "./checkpoints"
    run_name: str = "run"
    metric_name: str | None = None
    mode: str = "min"
    keep_top_k: int | None = None
    keep_last_n: int | None = None
    keep_period: int | None = None
    save_interval_steps: int = 1
    max_shard_size: int | str = "5GB"
    async_save: bool = False
    checkpoint_format: str = "safetensors"
    verify_on_load: bool = True
    # Big shards on a local disk are written with O_DIRECT (faster durable saves; the files are
    # then not in the page cache). False writes through the page cache.
    direct_io: bool = True
    # A writer's first save removes step directories without a marker (a crashed save's
    # leftovers) once nothing in them changed for this long; younger ones may be a save in flight.
    leftover_grace_s: float = 3600.0
    # Which modules model_architecture.json may name (the file is data, never a code path; rules
    # in ray_ckpt.architecture). None: torch.nn, transformers and the modules of live classes
    # this process described (write_architecture/register of a model or class, not a string).
    # A list: exactly those prefixes, matched on whole dotted components (an explicit opt-in).
    # The class must be a torch.nn.Module subclass; it is checked before anything is called.
    allowed_architecture_prefixes: list[str] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Orchestration (the checkpointer actor); ignored by the plain store.
    write_mode: str = "gather"
    save_timeout_s: float = 300.0
    max_pending_saves: int = 2
    lease_ttl_s: float = 600.0
    max_restarts: int = 3
    # Tiered saves: a local commit first, then a background upload to this prefix.
    remote_uri: str | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        self.max_shard_size = parse_size(self.max_shard_size, field_name="max_shard_size")
        _check_type(self, "storage_uri", str)
        _check_type(self, "run_name", str)
        if not self.storage_uri:
            raise ConfigError("storage_uri: must not be empty")
        from ray_ckpt.uri import validate_run_name  # local import: uri imports config

        validate_run_name(self.run_name, field_name="run_name")
        if self.metric_name is not None:
            _check_type(self, "metric_name", str)
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode: must be 'max' or 'min', got {self.mode!r}")
        for name in ("keep_top_k", "keep_last_n", "keep_period"):
            _check_optional_int(self, name, minimum=1 if name == "keep_period" else 0)
        _check_optional_int(self, "save_interval_steps", minimum=1, optional=False)
        _check_optional_int(self, "max_pending_saves", minimum=1, optional=False)
        _check_optional_int(self, "max_restarts", minimum=-1, optional=False)
        for name in ("async_save", "verify_on_load", "direct_io", "enabled"):
            _check_type(self, name, bool)
        if self.checkpoint_format not in ("safetensors", "pt"):
            raise ConfigError(
                f"checkpoint_format: must be 'safetensors' or 'pt', got {self.checkpoint_format!r}"
            )
        if self.write_mode not in ("gather", "direct"):
            raise ConfigError(f"write_mode: must be 'gather' or 'direct', got {self.write_mode!r}")
        grace = self.leftover_grace_s
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < math.inf:
            raise ConfigError(f"leftover_grace_s: must be a finite number of seconds >= 0, got {grace!r}")
        for name in ("save_timeout_s", "lease_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")
            if math.isinf(value) or math.isnan(value):
                raise ConfigError(f"{name}: must be finite, got {value!r}")
        if self.allowed_architecture_prefixes is not None:
            prefixes = self.allowed_architecture_prefixes
            if isinstance(prefixes, str) or not all(isinstance(p, str) and p for p in prefixes):
                raise ConfigError(
                    "allowed_architecture_prefixes: must be a list of non-empty strings, "
                    f"got {prefixes!r}"
                )
            self.allowed_architecture_prefixes = list(prefixes)
        if not isinstance(self.storage_options, dict):
            raise ConfigError(
                f"storage_options: must be a mapping, got {type(self.storage_options).__name__}"
            )
        if self.remote_uri is not None:
            _check_type(self, "remote_uri", str)

    @property
    def remote_checkpoints_enabled(self) -> bool:
        """Whether a remote tier is configured for background uploads."""
        return bool(self.remote_uri)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointConfig:
        """Build from a mapping; accepts NeMo-style aliases and rejects unknown keys by name."""
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}  # field -> the key that set it (an alias or the field itself)
        for key, value in data.items():
            if key == "higher_is_better":
                if not isinstance(value, bool):
                    raise ConfigError(f"higher_is_better: must be a bool, got {value!r}")
                name, value = "mode", "max" if value else "min"
            else:
                name = _ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(f"{key}: unknown config field (known: {', '.join(sorted(known))})")
            if name in kwargs and kwargs[name] != value:
                raise ConfigError(
                    f"{key}: conflicts with {given_as[name]} ({data[key]!r} vs {data[given_as[name]]!r}); give only one"
                )
            kwargs[name] = value
            given_as[name] = key
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CheckpointConfig:
        """Load a YAML file; the options may sit at the top level or under a ``checkpoint:`` key."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("checkpoint"), dict):
            data = data["checkpoint"]
        try:
            return cls.from_dict(data or {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> CheckpointConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_type(cfg: CheckpointConfig, name: str, typ: type) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, typ):
        raise ConfigError(f"{name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _check_optional_int(
    cfg: CheckpointConfig, name: str, *, minimum: int, optional: bool = True
) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
