"""Ray actors that train a tiny Llama with real torch.distributed (gloo, CPU): FSDP2, TP, FSDP x TP.

Shared by the sharded-state tests. Each actor joins a process group of any size on demand, so one
set of processes serves every world size of a reshard matrix (a group is torn down and rebuilt).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
import torch

import ray_ckpt

VOCAB = 64


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,  # 40 rows over 3 ranks: uneven shards (14, 14, 12)
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def full_numpy(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Full values of a (possibly DTensor) flat state, as numpy arrays (a collective for DTensors)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            out[key] = (
                value.detach().cpu().clone().view(torch.uint8).numpy()
                if value.dtype == torch.bfloat16
                else value.detach().cpu().clone().numpy()
            )
    return out


def flat_optim(optim_state: dict[str, Any]) -> dict[str, Any]:
    """The tensors of an optimizer state dict from get_state_dict, by ``<fqn>.<name>``."""
    return {f"{fqn}.{name}": v for fqn, entry in optim_state["state"].items() for name, v in entry.items()}


@ray.remote(num_cpus=0)
class ShardedRank:
    """One training process; ``join`` builds the group, the model and its parallel layout."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        self.group_world = 0

    def join(self, rank: int, world: int, port: int, layout: str, seed: int = 0) -> bool:
        """Join a ``world``-rank gloo group and build the model laid out as ``fsdp``, ``tp`` or ``fsdp_tp``."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from transformers import LlamaForCausalLM

        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        self.rank, self.world = rank, world
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config())
        if layout == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            dp = 2 if layout == "fsdp_tp" else 1
            mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
            plan = {}
            for i in range(len(model.model.layers)):
                for name in ("q_proj", "k_proj", "v_proj"):
                    plan[f"model.layers.{i}.self_attn.{name}"] = ColwiseParallel()
                plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
                plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
                plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
                plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
            parallelize_module(model, mesh["tp"], plan)
            if layout == "fsdp_tp":
                from torch.distributed.fsdp import fully_shard

                fully_shard(model, mesh=mesh["dp"])
        self.model = model
        self.optim = torch.optim.Adam(model.parameters(), lr=1e-2)
        self.layout = layout
        return True

    def train_step(self) -> float:
        """One forward/backward/Adam step on the same batch on every rank (FSDP layout)."""
        torch.manual_seed(123)
        ids = torch.randint(0, VOCAB, (2, 8))
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optim.step()
        self.optim.zero_grad()
        return float(loss.detach())

    def states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.model, self.optim)

    def save(self, run_name: str, step: int, blocking: bool = True, with_optim: bool = True) -> int:
        client = ray_ckpt.WorkerClient(run_name, self.rank, self.world)
        model_sd, optim_sd = self.states()
        future = client.save(
            step,
            model_sd,
            metrics={"loss": 1.0},
            trainer_state={"optim": optim_sd} if with_optim else None,
            blocking=blocking,
        )
        return future.result(120).step

    def full(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every full tensor of the model and the optimizer (collectives: call on every rank)."""
        model_sd, optim_sd = self.states()
        return full_numpy(model_sd), full_numpy(flat_optim(optim_sd))

    def load(self, run_name: str, step: int, with_optim: bool = True) -> int:
        """Reload model and optimizer from ``step`` in this process's own layout (resharding)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        client = ray_ckpt.WorkerClient(run_name, self.rank, self.world)
        model_sd, optim_sd = self.states()
        trainer = {"optim": optim_sd} if with_optim else None
        loaded = client.load(step, into=model_sd, trainer_into=trainer)
        set_state_dict(self.model, self.optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return loaded

    def load_with_dcp_hf_reader(self, path: str) -> dict[str, np.ndarray]:
        """Read a committed step into this layout's DTensors through DCP's own HF reader."""
        import torch.distributed.checkpoint as dcp

        model_sd, _ = self.states()
        target = {k: torch.zeros_like(v) for k, v in model_sd.items()}
        dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(path))
        return full_numpy(target)

    def leave(self) -> bool:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return True
