"""Small torch modules for architecture round-trip tests (importable as ``tests.models``)."""

from __future__ import annotations

import torch


class TinyMLP(torch.nn.Module):
    """Linear -> ReLU -> Linear, built from plain keyword arguments."""

    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 2) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, d_out)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TiedLM(torch.nn.Module):
    """An embedding tied to the output layer (one Parameter under two names)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))
