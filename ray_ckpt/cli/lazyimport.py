"""Deferred imports: a module that is imported on its first attribute access, not at ``import``.

The command line lists and verifies runs through the same modules that save and load tensors;
those import torch at their top, and importing torch costs seconds. ``defer_import("torch")``
puts a stand-in under ``sys.modules["torch"]``: ``import torch`` binds the stand-in, and the
first attribute anyone reads from it (``torch.zeros``, ``from torch import nn``,
``import torch.nn``) imports the real torch, whose attributes the stand-in then serves. A
command that never touches a tensor never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_LOCK = threading.RLock()


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:  # only for attributes not in this object's dict
        real = _load(self)
        return getattr(real, attr)


def _load(stand_in: _Deferred) -> types.ModuleType:
    name = stand_in.__name__
    with _LOCK:
        real = stand_in.__dict__.get("_deferred_real")
        if real is None:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
            real = importlib.import_module(name)
            own = {"_deferred_real": real}
            stand_in.__dict__.update({**real.__dict__, **own})  # later reads are plain attributes
        return real


def defer_import(name: str) -> bool:
    """Defer importing top-level module ``name`` to its first use; whether it was deferred
    (not when it is imported already or cannot be found)."""
    with _LOCK:
        if name in sys.modules or "." in name:
            return False
        spec = importlib.util.find_spec(name)
        if spec is None:
            return False
        stand_in = _Deferred(name)
        # `import name` reads __spec__ (to see whether it is still initializing): a plain attribute.
        # __path__ is left out: importing a submodule reads it, and that needs the real module.
        stand_in.__spec__ = spec
        stand_in.__loader__ = spec.loader
        sys.modules[name] = stand_in
        return True
