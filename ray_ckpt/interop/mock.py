"""Tiny deterministic models for tests and demos, served by ``mock://NAME`` URIs."""

from __future__ import annotations

import zlib

import torch
from torch import nn


class TinyPolicy(nn.Module):
    """A two-layer MLP policy: observations -> action logits (a few hundred parameters)."""

    def __init__(self, obs_dim: int = 4, hidden: int = 8, num_actions: int = 2) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.body = nn.Linear(obs_dim, hidden)
        self.head = nn.Linear(hidden, num_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(obs)))


MOCK_CONFIG = {"obs_dim": 4, "hidden": 8, "num_actions": 2}


def mock_state_dict(name: str, config: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Weights of a TinyPolicy seeded by ``name``: the same name always gives the same tensors."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    model = TinyPolicy(**(config or MOCK_CONFIG))
    return {
        key: torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.1
        for key, value in model.state_dict().items()
    }
