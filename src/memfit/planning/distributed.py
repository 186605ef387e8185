"""Training on several processes with torch.distributed: DDP or FSDP2.

    torchrun --nproc-per-node 2 -m memfit train --distributed ddp|fsdp ...

memfit launches nothing and communicates with nothing of its own: torchrun
starts the processes, `torch.distributed` (gloo on CPU, nccl on CUDA) does
the communication, and `DistributedDataParallel` or `fully_shard` (FSDP2)
wrap the model. Without torchrun, `--distributed` runs one process (world
size 1) on a free local port.

NOTE [order with FSDP2]
memfit applies its strategy first, then the model is sharded, one FSDP group
per memfit unit (a block, or a segment of blocks), then the root. So FSDP's
hooks run outside each checkpoint region: the pre-backward hook gathers a
unit's parameters before its recompute needs them. A segment of several
blocks must be one group: sharded block by block, the blocks after the
first would have given their parameters back when the segment recomputes,
and FSDP's forward hooks would hand each block a new tensor where the
segment expects the previous block's output.

NOTE [per-rank memory]
The planner and the startup report simulate one rank's step on the rank's
share of the batch, with FSDP2 itself on torch's fake process group (NOTE
[one rank simulated] in memfit.planning.sharding), at the world size of the
run. The planner solves on these per-rank numbers and checks its plan with
them, so budgets and peaks are per rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from memfit.core.blocks import find_blocks
from memfit.core.strategies import KEEP
from memfit.core.wrapping import applied_strategy
from memfit.errors import MemfitError

PARALLELISMS = ("none", "ddp", "fsdp")


@dataclass
class Ranks:
    kind: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup made the process group, so teardown ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def spec(self) -> tuple | None:
        """(kind, world size), as `memfit.plan(..., distributed=)` takes it; None for one plain process."""
        return (self.kind, self.world) if self.kind != "none" else None


def setup(kind: str, device: torch.device) -> Ranks:
    """Join the process group torchrun set up (or make one of one process)."""
    if kind not in PARALLELISMS:
        raise MemfitError(f"unknown distributed kind {kind!r}; use none, ddp or fsdp.")
    if kind == "none":
        return Ranks(device=device)
    if device.type not in ("cpu", "cuda"):
        raise MemfitError(
            f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}; use the cpu device."
        )
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun's environment
            dist.init_process_group(backend)
        else:  # not under torchrun: one process
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(kind, dist.get_rank(), dist.get_world_size(), device, owns)


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(batch, ranks: Ranks):
    """This rank's share of a global batch: a contiguous slice of each tensor's first dimension."""
    if ranks.world == 1:
        return batch

    def part(t):
        if not isinstance(t, torch.Tensor):
            return t
        n = t.shape[0] // ranks.world
        return t[ranks.rank * n : (ranks.rank + 1) * n]

    return tree_map(part, batch)


def parallelize(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The model to train: DDP around it, or sharded with FSDP2 after memfit is applied."""
    if ranks.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    if ranks.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shard(model, init_device_mesh(ranks.device.type, (ranks.world,)))
    return model


def shard(model: nn.Module, mesh, *, param_dtype=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over `mesh`, after memfit is applied: one group per memfit unit (a segment of blocks is one
    group, NOTE [order with FSDP2]), then the root. `param_dtype`: mixed precision as torchtitan trains
    (parameters gathered and computed in it; shards, gradient reduction and optimizer state in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for group in _groups(model):
        fully_shard(group if len(group) > 1 else group[0], **options)
    return fully_shard(model, **options)


def _groups(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks of each memfit unit (each block alone if memfit is not applied)."""
    applied = applied_strategy(model)
    chain = [b for _, b in find_blocks(model, (applied or {}).get("blocks"))]
    if not applied:
        return [[b] for b in chain]
    # a segment is one group (NOTE [order with FSDP2]); blocks kept as they are, one group each
    return [
        g
        for u in applied["units"]
        for g in ([[b] for b in chain[u.start : u.stop]] if u.mode == KEEP else [chain[u.start : u.stop]])
    ]


def broadcast(obj, ranks: Ranks):
    """Rank 0's `obj` (any picklable value), on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, ranks: Ranks):
    """`fn()` computed on rank 0 only, its result sent to every rank. A MemfitError
    there stops every rank with the same message, rather than leaving the others
    waiting for rank 0 at their next collective."""
    result = None
    if ranks.main:
        try:
            result = fn()
        except MemfitError as e:
            result = e
    result = broadcast(result, ranks)
    if isinstance(result, MemfitError):
        raise result
    return result


def reduce(value: float, ranks: Ranks, op: str = "mean") -> float:
    """The mean (or max) of a number over the ranks."""
    if ranks.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ranks.device if ranks.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() / (ranks.world if op == "mean" else 1)


def full_state_dict(model: nn.Module, ranks: Ranks) -> dict:
    """The whole model's state dict (on every rank; FSDP2 gathers the shards)."""
    if ranks.kind == "ddp":
        return model.module.state_dict()
    if ranks.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()
