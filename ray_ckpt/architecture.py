"""The run's ``model_architecture.json``: which class builds the model and with what config.

The file is data read from storage, never a code path. The rules, checked in this order
before anything named in the file is called:

1. ``class_path`` (and ``config_class``) is ``module.Class``: dotted Python identifiers, split at
   the last dot. Anything else (``""``, ``"torch.nn."``, ``"torch.nn..Linear"``, a number) is a
   :class:`CorruptCheckpointError`. ``config`` is a JSON object with string keys.
2. The module must be allowed, checked *before it is imported*:

   * ``allowed_architecture_prefixes=None`` (the default) allows the well-known model libraries
     in :data:`DEFAULT_ARCHITECTURE_PREFIXES` (``torch.nn``, ``transformers``) and the modules
     trusted in this process: :meth:`Architecture.describe` (so
     ``CheckpointStore.write_architecture`` and the checkpointer's ``register``) of a live class
     or model trusts that class's own module (exactly that module, not its package), because the
     writer's own code handed the class over. A class path given as a string trusts nothing.
   * A configured list means exactly that list (an explicit opt-in naming each prefix; ``[]``
     refuses everything). Prefixes match whole dotted components (``"pkg"`` allows
     ``pkg.models`` but never ``pkg_evil``); a prefix may also name one class exactly.

3. ``importlib.import_module(module)`` and one ``getattr`` (no attribute walking, so
   ``torch.nn.functional.torch.os.system`` names the module ``torch.nn.functional.torch.os``,
   which does not exist, and never reaches ``os``). A module under an allowed prefix that does
   not import, or lacks the attribute, is refused too.
4. The object must be a class subclassing ``torch.nn.Module`` whose defining module
   (``__module__``) is allowed as well (no re-exports from elsewhere). A ``config_class`` must be
   a class under the same rules and, when ``transformers`` is importable, a subclass of
   ``transformers.PretrainedConfig``.

Only then is ``Class(**config)`` or ``Class(ConfigClass(**config))`` called. Refusals raise
:class:`ArchitectureNotAllowedError`. Nested and local classes are not supported (one
``getattr``); :meth:`Architecture.describe` refuses them up front.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ckpt.errors import ArchitectureNotAllowedError, CorruptCheckpointError
from ray_ckpt.safejson import JsonObject

logger = logging.getLogger(__name__)

ARCHITECTURE_FILE = "model_architecture.json"
ARCHITECTURE_VERSION = 1

# What ``allowed_architecture_prefixes=None`` allows besides the modules trusted in this process.
DEFAULT_ARCHITECTURE_PREFIXES: tuple[str, ...] = ("torch.nn", "transformers")

_TRUSTED_MODULES: set[str] = set()
_TRUSTED_LOCK = threading.Lock()


def trust_module(module: str) -> None:
    """Trust one module (exactly it) in this process, as describing a live class of it does."""
    if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"trust_module: expected a dotted module name, got {module!r}")
    with _TRUSTED_LOCK:
        if module not in _TRUSTED_MODULES:
            logger.debug("trusting architecture module %s in this process", module)
        _TRUSTED_MODULES.add(module)


def trusted_modules() -> frozenset[str]:
    """The modules trusted in this process (see the module docstring)."""
    with _TRUSTED_LOCK:
        return frozenset(_TRUSTED_MODULES)


def forget_trusted_modules() -> None:
    """Forget every trusted module (for tests, which need a process with nothing trusted)."""
    with _TRUSTED_LOCK:
        _TRUSTED_MODULES.clear()


def split_dotted(path: Any, *, what: str = "class_path", name: str = ARCHITECTURE_FILE) -> tuple[str, str]:
    """``"pkg.mod.Class"`` -> ``("pkg.mod", "Class")``; CorruptCheckpointError unless dotted identifiers."""
    if not isinstance(path, str):
        raise CorruptCheckpointError(
            f"{name}: {what}: expected a 'module.Class' string, got {type(path).__name__}", path=name
        )
    module, _, attr = path.rpartition(".")
    if not module or not all(part.isidentifier() for part in path.split(".")):
        raise CorruptCheckpointError(
            f"{name}: {what}: {path[:200]!r} is not 'module.Class' (dotted Python identifiers)", path=name
        )
    return module, attr


def _within(path: str, prefix: str) -> bool:
    """Whether a dotted path lies under a prefix, matched on whole components.

    ``"pkg"`` and ``"pkg."`` both allow ``pkg.models.Net`` but never ``pkg_evil.Net``.
    """
    return path == prefix.rstrip(".") or path.startswith(prefix if prefix.endswith(".") else prefix + ".")


def module_allowed(module: str, class_path: str, allowed_prefixes: Sequence[str] | None) -> bool:
    """Whether ``module`` (holding ``class_path``) may be imported under ``allowed_prefixes``.

    ``None`` means :data:`DEFAULT_ARCHITECTURE_PREFIXES` plus the modules trusted in this process.
    A dunder component (``pkg.__main__``: a package's script) is never allowed; the one
    exception is the module ``__main__`` itself (a class defined in the running script).
    """
    if module != "__main__" and any(p.startswith("__") and p.endswith("__") for p in module.split(".")):
        return False
    if allowed_prefixes is None:
        return module in trusted_modules() or any(_within(module, p) for p in DEFAULT_ARCHITECTURE_PREFIXES)
    return any(_within(module, p) or class_path == p for p in allowed_prefixes)


def describe_allowed(allowed_prefixes: Sequence[str] | None) -> str:
    """The allow-list in words, for error messages."""
    if allowed_prefixes is None:
        trusted = sorted(trusted_modules())
        return (
            f"the default allow-list {list(DEFAULT_ARCHITECTURE_PREFIXES)} + modules trusted in this process "
            f"{trusted} (set allowed_architecture_prefixes, CLI --allow-architecture, to opt a prefix in)"
        )
    return f"allowed_architecture_prefixes {list(allowed_prefixes)}"


def served_prefixes(configured: list[str] | None, arch: Architecture) -> list[str] | None:
    """The allow-list a run's checkpointer serves its clients after ``register(arch)``.

    With nothing configured, other processes (eval clients) get the default prefixes plus the
    modules of ``arch`` that this process trusts (a live class was registered); a configured
    list is served unchanged. ``None`` means nothing to add.
    """
    if configured is not None:
        return configured
    modules = [split_dotted(p)[0] for p in filter(None, (arch.class_path, arch.config_class))]
    extra = [m for m in dict.fromkeys(modules) if m in trusted_modules()]
    if not extra:
        return None
    return [*DEFAULT_ARCHITECTURE_PREFIXES, *extra]


def _refuse(what: str, path: str, why: str) -> ArchitectureNotAllowedError:
    return ArchitectureNotAllowedError(f"{ARCHITECTURE_FILE}: {what} {path!r} {why}; nothing was built")


def resolve_class(path: Any, allowed_prefixes: Sequence[str] | None, *, what: str = "class_path") -> type:
    """The class ``module.Class`` names, under the rules of the module docstring (nothing called)."""
    module_name, attr = split_dotted(path, what=what)
    if not module_allowed(module_name, path, allowed_prefixes):
        raise ArchitectureNotAllowedError(
            f"{ARCHITECTURE_FILE}: {what} {path!r} is outside {describe_allowed(allowed_prefixes)}; "
            "nothing was imported"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # ModuleNotFoundError too: e.g. 'torch.nn.functional.torch.os'
        raise _refuse(what, path, f"does not name an importable module here ({exc})") from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, type):
        raise _refuse(what, path, f"is not a class (got {type(obj).__name__})")
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str) or not module_allowed(defined_in, path, allowed_prefixes):
        raise _refuse(what, path, f"is defined in {defined_in!r}, outside {describe_allowed(allowed_prefixes)}")
    return obj


def _pretrained_config_class() -> type | None:
    """``transformers.PretrainedConfig`` when transformers is importable, else None."""
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    return transformers.PretrainedConfig


@dataclass
class Architecture:
    """A model class path, its constructor config and, for Hugging Face models, the config class."""

    class_path: str
    config: dict[str, Any] = field(default_factory=dict)
    config_class: str | None = None

    @classmethod
    def describe(
        cls, model_or_class_path: torch.nn.Module | type | str, config: Any = None, *, trust: bool = True
    ) -> Architecture:
        """Describe a model instance, a class or a ``module.Class`` path.

        A live class or model (``trust=True``) makes its module, and its config's class's module,
        trusted in this process (see the module docstring); a string trusts nothing. Pass
        ``trust=False`` for classes that came from a file (a legacy pickle) rather than the
        caller's own code. Nested and local classes are refused (ValueError): a class path is
        resolved with one ``getattr`` on its module.
        """
        trusted: list[str] = []
        if isinstance(model_or_class_path, str):
            class_path = model_or_class_path
            model = None
        else:
            model = model_or_class_path
            klass = model if isinstance(model, type) else type(model)
            class_path = _class_path_of(klass)
            trusted.append(klass.__module__)
        config_class = None
        if config is None and model is not None and not isinstance(model, type):
            config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict") and not isinstance(config, dict):
            klass = type(config)
            config_class = _class_path_of(klass)
            trusted.append(klass.__module__)
            config = config.to_dict()
        config = dict(config or {})
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"model_architecture config: not JSON serialisable: {exc}") from exc
        if not all(isinstance(k, str) for k in config):
            raise TypeError("model_architecture config: keys must be strings")
        try:
            split_dotted(class_path)
        except CorruptCheckpointError:
            raise ValueError(
                f"model_architecture class_path: expected 'module.Class', got {class_path!r}"
            ) from None
        if trust:
            for module in trusted:
                trust_module(module)
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
        """Parse and validate the file (CorruptCheckpointError naming it); imports nothing."""
        obj = JsonObject.parse(data, name=name)
        version = obj.int("format_version", ARCHITECTURE_VERSION, lo=0)
        if version > ARCHITECTURE_VERSION:
            raise obj.error("format_version", f"{version} is newer than this ray-ckpt reads ({ARCHITECTURE_VERSION})")
        class_path = obj.str("class_path")
        config = obj.dict("config", {})
        config_class = obj.str("config_class", None)
        arch = cls(class_path, config, config_class)
        arch.validate(name=name)
        return arch

    def validate(self, *, name: str = ARCHITECTURE_FILE) -> None:
        """Check the shape of every field (CorruptCheckpointError naming ``name``); imports nothing."""
        split_dotted(self.class_path, name=name)
        if self.config_class is not None:
            split_dotted(self.config_class, what="config_class", name=name)
        if not isinstance(self.config, dict):
            raise CorruptCheckpointError(
                f"{name}: config: expected an object, got {type(self.config).__name__}", path=name
            )
        bad = [k for k in self.config if not isinstance(k, str)]
        if bad:
            raise CorruptCheckpointError(f"{name}: config: keys must be strings, got {bad[0]!r}", path=name)

    def check_allowed(self, allowed_prefixes: Sequence[str] | None) -> None:
        """Refuse (before importing anything) a class or config class whose module is not allowed."""
        self.validate()
        for what, path in (("class_path", self.class_path), ("config_class", self.config_class)):
            if path is None:
                continue
            module, _ = split_dotted(path, what=what)
            if not module_allowed(module, path, allowed_prefixes):
                raise ArchitectureNotAllowedError(
                    f"{ARCHITECTURE_FILE}: {what} {path!r} is outside {describe_allowed(allowed_prefixes)}; "
                    "nothing was imported"
                )

    def resolve(self, allowed_prefixes: Sequence[str] | None = None) -> tuple[type, type | None]:
        """The model class and config class (or None), every rule checked; nothing is called."""
        self.check_allowed(allowed_prefixes)
        klass = resolve_class(self.class_path, allowed_prefixes)
        if not issubclass(klass, torch.nn.Module):
            raise _refuse("class_path", self.class_path, "is not a torch.nn.Module subclass")
        config_klass = None
        if self.config_class is not None:
            config_klass = resolve_class(self.config_class, allowed_prefixes, what="config_class")
            base = _pretrained_config_class()
            if base is not None and not issubclass(config_klass, base):
                raise _refuse("config_class", self.config_class, "is not a transformers.PretrainedConfig subclass")
        return klass, config_klass

    def build(self, allowed_prefixes: Sequence[str] | None = None) -> torch.nn.Module:
        """Construct the (untrained) model: ``Class(ConfigClass(**config))`` or ``Class(**config)``.

        ``allowed_prefixes`` as ``allowed_architecture_prefixes`` (None: the defaults plus the
        modules trusted in this process); every rule is checked before anything is called.
        """
        klass, config_klass = self.resolve(allowed_prefixes)
        if config_klass is not None:
            model = klass(config_klass(**self.config))
        else:
            model = klass(**self.config)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{ARCHITECTURE_FILE}: {self.class_path} did not build a torch.nn.Module")
        return model


def _class_path_of(klass: type) -> str:
    """``module.Class`` of a module-level class; ValueError for nested or local classes."""
    qualname = klass.__qualname__
    if "." in qualname or not qualname.isidentifier():
        raise ValueError(
            f"model_architecture: {klass.__module__}.{qualname} is a nested or local class; only a "
            "module-level class can be rebuilt from model_architecture.json (module + one attribute)"
        )
    return f"{klass.__module__}.{qualname}"

