"""The private APIs ray-ckpt still uses, guarded: a torch or Ray release that moves or changes one
fails here, naming what to replace, instead of failing a save somewhere in a Ray actor.

``ray_ckpt.core.shard.local_part`` asks torch where a DTensor's local shard lies in the global tensor
(``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``): torch has no public
function for it (DCP's planner uses the same one). safetensors' dtype table is no longer read from
a private attribute: ``ray_ckpt.core.format.buffers`` asks ``safetensors.torch.save`` itself.

``ray_ckpt.distributed.drain`` reads Ray's drain (preemption) signal and sends drain requests
through ``ray._raylet.GcsClient`` (``get_draining_nodes``, ``drain_node``): Ray has no public API
for it outside Ray Train's worker group; the ``ray drain-node`` CLI and Ray Train's preemption
watcher use the same calls. tests/distributed/test_drain.py drives them on a real cluster.
"""

from __future__ import annotations

import inspect
import os
import socket

import pytest
import torch

PRIVATE = "torch.distributed.tensor._utils.compute_local_shape_and_global_offset"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_private_dtensor_offset_function_is_where_and_what_ray_ckpt_expects() -> None:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as exc:
        pytest.fail(f"{PRIVATE} is gone in torch {torch.__version__} ({exc}); ray_ckpt.core.shard.local_part needs "
                    "another way to find a DTensor shard's global offsets")  # fmt: skip
    params = list(inspect.signature(compute_local_shape_and_global_offset).parameters)
    assert params[:3] == ["global_shape", "mesh", "placements"], (
        f"{PRIVATE} changed its signature in torch {torch.__version__}: {params}; update ray_ckpt.core.shard.local_part"
    )


def test_the_private_dtensor_offsets_match_the_local_shards() -> None:
    """On a real (one-rank, gloo) mesh: the shape it gives is the local shard's, the offset zero,
    and ``local_part`` describes the DTensor as a Shard of the full tensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ray_ckpt.core.shard import local_part

    started = not dist.is_initialized()
    if started:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.arange(12.0).reshape(4, 3)
        for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
            dt = distribute_tensor(full, mesh, placements)
            shape, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
            assert (tuple(shape), tuple(offsets)) == ((4, 3), (0, 0)), (
                f"{PRIVATE} answered {shape}, {offsets} for {placements} in torch {torch.__version__}; "
                "update ray_ckpt.core.shard.local_part"
            )
            local, global_shape, where = local_part(dt, key="w")
            assert torch.equal(local, full) and global_shape == (4, 3) and where == (0, 0)
    finally:
        if started:
            dist.destroy_process_group()


def test_the_dtype_table_comes_from_safetensors_public_save() -> None:
    import ray_ckpt.core.format.buffers as fmt

    source = inspect.getsource(fmt._safetensors_dtypes)
    assert "._SIZE" not in source and "st.save(" in source
    assert {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"} <= set(fmt.DTYPE_TO_TORCH), (
        f"safetensors no longer writes a basic dtype: {sorted(fmt.DTYPE_TO_TORCH)}"
    )
    assert fmt.DTYPE_SIZE["BF16"] == 2 and fmt.TORCH_TO_DTYPE[torch.float32] == "F32"


def test_the_private_gcs_drain_calls_are_where_ray_ckpt_expects() -> None:
    import ray
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    from ray_ckpt.distributed.drain import DRAIN_REASONS

    inner = getattr(ray._raylet, "InnerGcsClient", None)  # GcsClient forwards its calls to it
    assert inner is not None and hasattr(ray._raylet, "GcsClient"), (
        f"ray._raylet.GcsClient moved in Ray {ray.__version__}; update ray_ckpt.distributed.drain"
    )
    for name, param in (("get_draining_nodes", "timeout"), ("drain_node", "deadline_timestamp_ms")):
        method = getattr(inner, name, None)
        assert method is not None and param in (method.__doc__ or ""), (
            f"GcsClient.{name} is gone or changed in Ray {ray.__version__}: {getattr(method, '__doc__', None)!r}; "
            "update ray_ckpt.distributed.drain"
        )
    assert set(DRAIN_REASONS.values()) <= set(autoscaler_pb2.DrainNodeReason.keys()), (
        f"Ray {ray.__version__} renamed its drain reasons: {autoscaler_pb2.DrainNodeReason.keys()}"
    )
