"""The run's ``model_architecture.json``: which class builds the model and with what config.

Imports a class only when its path is inside the allowed prefixes, checked before any import.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ckpt.errors import ArchitectureNotAllowedError, CorruptCheckpointError

ARCHITECTURE_FILE = "model_architecture.json"
ARCHITECTURE_VERSION = 1


@dataclass
class Architecture:
    """A model class path, its constructor config and, for Hugging Face models, the config class."""

    class_path: str
    config: dict[str, Any] = field(default_factory=dict)
    config_class: str | None = None

    @classmethod
    def describe(cls, model_or_class_path: torch.nn.Module | type | str, config: Any = None) -> Architecture:
        """Describe a model instance, a class or a ``module.Class`` path."""
        if isinstance(model_or_class_path, str):
            class_path = model_or_class_path
            model = None
        else:
            model = model_or_class_path
            klass = model if isinstance(model, type) else type(model)
            class_path = f"{klass.__module__}.{klass.__qualname__}"
        config_class = None
        if config is None and model is not None and not isinstance(model, type):
            config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict") and not isinstance(config, dict):
            klass = type(config)
            config_class = f"{klass.__module__}.{klass.__qualname__}"
            config = config.to_dict()
        config = dict(config or {})
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"model_architecture config: not JSON serialisable: {exc}") from exc
        if "." not in class_path:
            raise ValueError(f"model_architecture class_path: expected 'module.Class', got {class_path!r}")
        return cls(class_path, config, config_class)

    def to_json_bytes(self) -> bytes:
        data = {
            "format_version": ARCHITECTURE_VERSION,
            "class_path": self.class_path,
            "config_class": self.config_class,
            "config": self.config,
        }
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, name: str = ARCHITECTURE_FILE) -> Architecture:
        try:
            raw = json.loads(data)
            class_path = raw["class_path"]
            config = {} if raw.get("config") is None else raw["config"]
            config_class = raw.get("config_class")
            if not isinstance(class_path, str) or not isinstance(config, dict):
                raise ValueError("class_path must be a string and config an object")
            if config_class is not None and not isinstance(config_class, str):
                raise ValueError("config_class must be a string or null")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{name}: malformed: {exc}", path=name) from exc
        return cls(class_path, config, config_class)

    def check_allowed(self, allowed_prefixes: list[str] | None) -> None:
        """Refuse (before importing anything) a class or config class outside the prefixes."""
        if allowed_prefixes is None:
            return
        for path in filter(None, (self.class_path, self.config_class)):
            if not any(_within(path, prefix) for prefix in allowed_prefixes):
                raise ArchitectureNotAllowedError(
                    f"{ARCHITECTURE_FILE}: class {path!r} is outside allowed_architecture_prefixes "
                    f"{allowed_prefixes}; nothing was imported"
                )

    def build(self, allowed_prefixes: list[str] | None = None) -> torch.nn.Module:
        """Construct the (untrained) model: ``Class(ConfigClass(**config))`` or ``Class(**config)``."""
        self.check_allowed(allowed_prefixes)
        klass = import_class(self.class_path)
        if self.config_class:
            config_klass = import_class(self.config_class)
            model = klass(config_klass(**self.config))
        else:
            model = klass(**self.config)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{ARCHITECTURE_FILE}: {self.class_path} did not build a torch.nn.Module")
        return model


def _within(path: str, prefix: str) -> bool:
    """Whether a dotted path lies under a prefix, matched on whole components.

    ``"pkg"`` and ``"pkg."`` both allow ``pkg.models.Net`` but never ``pkg_evil.Net``.
    """
    return path == prefix.rstrip(".") or path.startswith(prefix if prefix.endswith(".") else prefix + ".")


def import_class(path: str) -> Any:
    """Import ``package.module.Class`` (nested classes too) from its dotted path."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ImportError(f"{ARCHITECTURE_FILE}: {path!r}: {exc}") from exc
        return obj
    raise ImportError(f"{ARCHITECTURE_FILE}: cannot import {path!r}")
