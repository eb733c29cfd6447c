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
import inspect
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ckpt.core.errors import ArchitectureNotAllowedError, CorruptCheckpointError
from ray_ckpt.core.safejson import JsonObject

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
    """A model class path, its constructor config and, for Hugging Face models, the config class.

    ``generation_config`` is a Hugging Face model's ``GenerationConfig`` (as a dict), kept so that
    an exported step writes the ``generation_config.json`` its model had.
    """

    class_path: str
    config: dict[str, Any] = field(default_factory=dict)
    config_class: str | None = None
    generation_config: dict[str, Any] | None = None

    @classmethod
    def describe(
        cls,
        model_or_class_path: torch.nn.Module | type | str | Architecture,
        config: Any = None,
        *,
        trust: bool = True,
    ) -> Architecture:
        """Describe a model instance, a class, a ``module.Class`` path (or an Architecture, checked).

        The config: a ``PretrainedConfig`` (its class is kept), a dict of constructor arguments
        (for a Hugging Face model class the dict is its config's, and the model's config class is
        kept), or None: a Hugging Face model's ``.config``, else the constructor arguments read
        back from the instance's attributes (see :func:`constructor_args`), refused with a
        TypeError naming the ones it cannot recover.

        A live class or model (``trust=True``) makes its module, and its config's class's module,
        trusted in this process (see the module docstring); a string trusts nothing. Pass
        ``trust=False`` for classes that came from a file (a legacy pickle) rather than the
        caller's own code. Nested and local classes are refused (ValueError): a class path is
        resolved with one ``getattr`` on its module.
        """
        if isinstance(model_or_class_path, Architecture):
            if config is not None:
                raise TypeError("Architecture.describe: an Architecture carries its own config; pass config=None")
            arch = model_or_class_path
            try:
                arch.validate(name="model_architecture")
            except CorruptCheckpointError as exc:
                raise ValueError(str(exc)) from None
            return cls(arch.class_path, dict(arch.config), arch.config_class, arch.generation_config)
        trusted: list[str] = []
        klass: type | None = None
        instance: torch.nn.Module | None = None
        if isinstance(model_or_class_path, str):
            class_path = model_or_class_path
        else:
            klass = model_or_class_path if isinstance(model_or_class_path, type) else type(model_or_class_path)
            instance = None if isinstance(model_or_class_path, type) else model_or_class_path
            class_path = _class_path_of(klass)
            trusted.append(klass.__module__)
        config_class = None
        generation_config = _generation_config_of(instance)
        if config is None and instance is not None:
            own = getattr(instance, "config", None)
            if isinstance(own, Mapping) or _is_pretrained_config(own):
                config = own
        if config is not None and hasattr(config, "to_dict") and not isinstance(config, Mapping):
            config_klass = type(config)
            config_class = _class_path_of(config_klass)
            trusted.append(config_klass.__module__)
            config = config.to_dict()
        elif isinstance(config, Mapping):
            config_klass = _hf_config_class_for(klass, class_path, config)
            if config_klass is not None:
                config_class = _class_path_of(config_klass)
                trusted.append(config_klass.__module__)
        elif config is None and klass is not None:
            config = constructor_args(instance if instance is not None else klass, check=trust)
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
            raise ValueError(f"model_architecture class_path: expected 'module.Class', got {class_path!r}") from None
        if trust:
            for module in trusted:
                trust_module(module)
        return cls(class_path, config, config_class, generation_config)

    def to_json_bytes(self) -> bytes:
        data = {
            "format_version": ARCHITECTURE_VERSION,
            "class_path": self.class_path,
            "config_class": self.config_class,
            "config": self.config,
        }
        if self.generation_config is not None:
            data["generation_config"] = self.generation_config
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
        generation_config = obj.dict("generation_config", None)
        arch = cls(class_path, config, config_class, generation_config)
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


# ---------------------------------------------------------------------------------------------
# Constructor arguments of plain modules; Hugging Face configs both ways.
# ---------------------------------------------------------------------------------------------
HF_CONFIG_FILE = "config.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
_JSON_SCALARS = (str, int, float, bool, type(None))


def _is_pretrained_config(value: Any) -> bool:
    """Whether a value is a config object with ``to_dict`` (a transformers ``PretrainedConfig``)."""
    return value is not None and not isinstance(value, Mapping) and callable(getattr(value, "to_dict", None))


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists), or ``_NOT_JSON`` when it is not data."""
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return _NOT_JSON if any(v is _NOT_JSON for v in items) else items
    return _NOT_JSON


_NOT_JSON: Any = object()


def constructor_args(model_or_class: torch.nn.Module | type, *, check: bool = True) -> dict[str, Any]:
    """The constructor arguments of a module, read back from the attributes of the same names.

    ``torch.nn.Linear(8, 2)`` -> ``{"in_features": 8, "out_features": 2}``: every parameter of
    ``__init__`` that the instance holds as an attribute with a JSON value is recorded; one
    with a default and no such attribute keeps its default. A required parameter that cannot
    be recovered (or a class given without an instance) raises TypeError naming it, and so do
    recovered arguments that build a model of other tensor shapes than the instance's: pass the
    config explicitly then (``write_architecture(model, {...})``). ``check=False`` skips that
    rebuild (a class from a file, whose constructor nothing has vetted, is never called here).
    """
    klass = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    instance = None if isinstance(model_or_class, type) else model_or_class
    try:
        signature = inspect.signature(klass.__init__)
    except (TypeError, ValueError):
        return {}
    args: dict[str, Any] = {}
    missing: list[str] = []
    for name, param in list(signature.parameters.items())[1:]:  # [0] is self
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        value = _json_value(getattr(instance, name, _NOT_JSON)) if instance is not None else _NOT_JSON
        if value is not _NOT_JSON and param.kind is not inspect.Parameter.POSITIONAL_ONLY:
            args[name] = value
        elif param.default is inspect.Parameter.empty:
            missing.append(name)
    path = f"{klass.__module__}.{klass.__qualname__}"
    if missing:
        where = (
            "a class has no attributes to read them from"
            if instance is None
            else ("they are not attributes of the instance")
        )
        raise TypeError(
            f"model_architecture: cannot record the constructor arguments {missing} of {path} ({where}); "
            f"pass them: write_architecture(model, {{{', '.join(f'{m!r}: ...' for m in missing)}}}) "
            "or register(model, config)"
        )
    if instance is not None and check:
        _check_rebuilds(klass, instance, args, path)
    return args


def _check_rebuilds(klass: type, instance: torch.nn.Module, args: dict[str, Any], path: str) -> None:
    """TypeError unless ``klass(**args)`` (built on the meta device: no memory) has the instance's shapes."""
    try:
        with torch.device("meta"):
            built = klass(**args)
        expected = {k: tuple(v.shape) for k, v in instance.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    except Exception as exc:  # a constructor that cannot run on meta: the recovered arguments stand
        logger.debug("%s: not rebuilt on the meta device to check %s: %s", path, args, exc)
        return
    if expected != got:
        differ = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise TypeError(
            f"model_architecture: {path}({', '.join(f'{k}={v!r}' for k, v in args.items())}) read back from the "
            f"instance's attributes builds other tensors than the instance has (e.g. {differ[:3]}); pass the "
            "constructor arguments: write_architecture(model, {...}) or register(model, config)"
        )


def _hf_config_class_for(klass: type | None, class_path: str, config: Mapping[str, Any]) -> type | None:
    """The ``PretrainedConfig`` class a Hugging Face model class builds from (a config given as a dict).

    A live class tells it (``config_class``); a ``transformers`` class path with a ``model_type``
    in the dict is looked up in transformers' own table. None for other models.
    """
    base = _pretrained_config_class() if klass is not None or "model_type" in config else None
    if base is None:
        return None
    if klass is not None:
        own = getattr(klass, "config_class", None)
        return own if isinstance(own, type) and issubclass(own, base) else None
    if not _within(class_path, "transformers"):
        return None
    model_type = config.get("model_type")
    name = _config_class_name(model_type) if isinstance(model_type, str) else None
    if name is None:
        return None
    import transformers

    found = getattr(transformers, name, None)
    return found if isinstance(found, type) and issubclass(found, base) else None


def _config_class_name(model_type: str) -> str | None:
    """transformers' config class name for a ``model_type`` (``"gpt2"`` -> ``"GPT2Config"``), or None."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return None
    return CONFIG_MAPPING_NAMES.get(model_type)


def _generation_config_of(model: Any) -> dict[str, Any] | None:
    """A Hugging Face model's ``generation_config`` as a dict (None for other models)."""
    generation = getattr(model, "generation_config", None) if model is not None else None
    if generation is None or not callable(getattr(generation, "to_dict", None)):
        return None
    try:
        data = generation.to_dict()
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        logger.debug("generation_config not recorded: %s", exc)
        return None
    return data


def architecture_from_hf_config(
    config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None, *, name: str = HF_CONFIG_FILE
) -> Architecture | None:
    """The architecture a Hugging Face ``config.json`` describes (``architectures[0]`` of its
    ``model_type``), as ``transformers.<Class>`` paths; None when it names no class.

    Nothing is imported but transformers' table of config class names.
    """
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if not isinstance(architectures, list) or not architectures or not isinstance(model_type, str):
        return None
    class_name = architectures[0]
    config_name = _config_class_name(model_type)
    if not isinstance(class_name, str) or not class_name.isidentifier() or config_name is None:
        logger.info("%s: model_type %r / architectures %r is not a transformers model", name, model_type, architectures)
        return None
    arch = Architecture(
        f"transformers.{class_name}",
        dict(config),
        f"transformers.{config_name}",
        dict(generation_config) if generation_config is not None else None,
    )
    arch.validate(name=name)
    return arch


def hf_config_files(arch: Architecture, allowed_prefixes: Sequence[str] | None = None) -> dict[str, bytes]:
    """The Hugging Face side files of a recorded architecture: ``config.json`` (with
    ``model_type`` and ``architectures``) and, for a model that generates, ``generation_config.json``,
    as ``save_pretrained`` writes them; ``{}`` for a model that is not a transformers model.

    Written into each step (and an exported folder) so that ``AutoModel*.from_pretrained`` reads
    it as it is. The classes are resolved under the allow-list rules (nothing outside is imported).
    """
    if arch.config_class is None:
        return {}
    model_klass, config_klass = arch.resolve(allowed_prefixes)
    if config_klass is None or not hasattr(config_klass, "from_dict"):
        return {}
    config = config_klass.from_dict(dict(arch.config))
    config.architectures = [model_klass.__name__]
    files = {HF_CONFIG_FILE: config.to_json_string(use_diff=True).encode()}
    generation = _generation_config_for(model_klass, config, arch.generation_config)
    if generation is not None:
        files[HF_GENERATION_CONFIG_FILE] = generation.to_json_string(use_diff=True).encode()
    return files


def _generation_config_for(model_klass: type, config: Any, recorded: dict[str, Any] | None) -> Any:
    """The ``GenerationConfig`` to write: the recorded one, else what transformers derives for a
    model class that can generate (as ``save_pretrained`` does); None otherwise."""
    try:
        from transformers import GenerationConfig
    except ImportError:
        return None
    if recorded is not None:
        return GenerationConfig.from_dict(dict(recorded))
    can_generate = getattr(model_klass, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return None
    try:
        return GenerationConfig.from_model_config(config)
    except NotImplementedError:
        return GenerationConfig()
