"""One-shot save_checkpoint / load_checkpoint / load_metadata, on local disk and S3."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ray_ckpt
from ray_ckpt import CheckpointStore
from ray_ckpt.core.errors import CheckpointNotFoundError, ConfigError


@pytest.fixture(params=["local", "s3"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A run directory (``<storage>/<run>``) and its storage options."""
    if request.param == "local":
        return str(tmp_path / "ckpts" / "agent"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/ckpts/agent", options


def make_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {
        "params": {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.float64)},
        "opt": [np.arange(4, dtype=np.float32) + seed, (torch.ones(1), 7)],
        "step": seed,
        "name": "ppo",
    }


def test_save_load_metadata_round_trip(directory: tuple[str, dict[str, Any]]) -> None:
    path, options = directory
    assert ray_ckpt.load_metadata(path, storage_options=options) is None
    with pytest.raises(CheckpointNotFoundError):
        ray_ckpt.load_checkpoint(path, storage_options=options)

    first = ray_ckpt.save_checkpoint(path, make_state(0), metadata={"env": "cartpole"}, storage_options=options)
    second = ray_ckpt.save_checkpoint(path, make_state(1), storage_options=options)
    assert (first.step, second.step) == (0, 1)  # step defaults to one past the latest
    ray_ckpt.save_checkpoint(path, make_state(5), step=5, metadata=[1, "two"], storage_options=options)

    latest = ray_ckpt.load_checkpoint(path, storage_options=options)
    expected = make_state(5)
    torch.testing.assert_close(latest["params"]["w"], expected["params"]["w"])
    assert latest["step"] == 5 and latest["name"] == "ppo"
    assert isinstance(latest["opt"][0], np.ndarray) and isinstance(latest["opt"][1], tuple)
    earlier = ray_ckpt.load_checkpoint(path, step=0, storage_options=options)
    torch.testing.assert_close(earlier["params"]["w"], make_state(0)["params"]["w"])

    assert ray_ckpt.load_metadata(path, step=0, storage_options=options) == {"env": "cartpole"}
    assert ray_ckpt.load_metadata(path, step=1, storage_options=options) is None
    assert ray_ckpt.load_metadata(path, storage_options=options) == [1, "two"]

    # The same run any other reader sees.
    parent, run = path.rsplit("/", 1)
    assert [i.step for i in CheckpointStore(parent, run, options).list()] == [0, 1, 5]


def test_load_with_a_template_checks_shapes_and_dtypes(directory: tuple[str, dict[str, Any]]) -> None:
    path, options = directory
    ray_ckpt.save_checkpoint(path, make_state(2), storage_options=options)
    like = make_state(99)
    restored = ray_ckpt.load_checkpoint(path, like=like, storage_options=options)
    torch.testing.assert_close(restored["params"]["w"], make_state(2)["params"]["w"])
    assert isinstance(restored["opt"][0], np.ndarray)

    # A template of numpy arrays gets numpy arrays back; an OrderedDict template an OrderedDict.
    numpy_like = OrderedDict(make_state(0))
    numpy_like["params"] = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float64)}
    restored = ray_ckpt.load_checkpoint(path, like=numpy_like, storage_options=options)
    assert isinstance(restored, OrderedDict) and isinstance(restored["params"]["w"], np.ndarray)

    bad_shape = make_state(0)
    bad_shape["params"]["w"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"params\.w: shape \(3, 2\) in the checkpoint, \(2, 3\) in the template"):
        ray_ckpt.load_checkpoint(path, like=bad_shape, storage_options=options)
    bad_dtype = make_state(0)
    bad_dtype["params"]["b"] = torch.zeros(2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"params\.b: dtype torch.float64 in the checkpoint"):
        ray_ckpt.load_checkpoint(path, like=bad_dtype, storage_options=options)
    bad_numpy = make_state(0)
    bad_numpy["opt"][0] = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"opt\.0: dtype"):
        ray_ckpt.load_checkpoint(path, like=bad_numpy, storage_options=options)
    missing = make_state(0)
    missing["params"]["extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="extra"):
        ray_ckpt.load_checkpoint(path, like=missing, storage_options=options)


def test_modules_and_optimizers_are_saved_as_state_dicts(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "run1"
    ray_ckpt.save_checkpoint(path, {"model": model, "optimizer": optimizer})
    state = ray_ckpt.load_checkpoint(path, like={"model": model, "optimizer": optimizer})
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(ConfigError):
        ray_ckpt.save_checkpoint(f"{path}:latest", {"w": torch.ones(1)})
