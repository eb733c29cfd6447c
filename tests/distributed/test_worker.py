"""The worker's snapshot: private copies in buffers reused from one save to the next (no Ray needed)."""

from __future__ import annotations

import torch

from ray_ckpt import Shard
from ray_ckpt.distributed.worker import Snapshot


def test_snapshot_copies_and_reuses_its_buffers_once_given_back() -> None:
    snapshot = Snapshot()
    state = {"w": torch.arange(12.0).reshape(3, 4), "part": Shard(torch.ones(2, 4), (6, 4), (2, 0))}
    first = snapshot.take("model", state, "state_dict")
    assert first.tensors["w"].data.ctypes.data != state["w"].data_ptr()  # a private copy
    assert (first.tensors["part"].global_shape, first.tensors["part"].offsets) == ((6, 4), (2, 0))
    state["w"].add_(100)  # training goes on: the snapshot keeps the values it took
    assert first.tensors["w"].data.view("float32")[0] == 0.0
    second = snapshot.take("model", state, "state_dict")  # the first save is still in flight: new buffers
    assert second.tensors["w"].data.ctypes.data != first.tensors["w"].data.ctypes.data
    snapshot.give_back(first)
    third = snapshot.take("model", state, "state_dict")  # reuses the first save's (already faulted) pages
    assert third.tensors["w"].data.ctypes.data == first.tensors["w"].data.ctypes.data
    assert third.tensors["w"].data.view("float32")[0] == 100.0
    changed = snapshot.take("model", {"w": torch.zeros(5)}, "state_dict")  # another shape: a buffer of its own
    assert changed.tensors["w"].shape == (5,)
