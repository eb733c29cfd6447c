"""Module -> state dict, once for every adapter (the Orbax-style manager, the one-shot functions, Metta)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plain_state(state: Any) -> Any:
    """``state`` with every module, optimizer (anything with a ``state_dict()``) replaced by its
    state dict; mappings, lists and tuples are walked, anything else is kept as it is."""
    if not isinstance(state, Mapping) and callable(getattr(state, "state_dict", None)):
        return state.state_dict()
    if isinstance(state, Mapping):
        return {k: plain_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)) and type(state) in (list, tuple):
        return type(state)(plain_state(v) for v in state)
    return state


__all__ = ["plain_state"]
