"""One rank of a data-parallel run (DDP, FSDP2, FSDP2 × tensor parallelism) at any world size, simulated in
this process by torch's own engine: the per-rank numbers every distributed plan rests on.

NOTE [one rank simulated]
A rank's memory under FSDP2 is what FSDP2's own code allocates: the sharded
parameters, gradients and optimizer state, the all-gather and
reduce-scatter buffers, what it prefetches, the casts of mixed precision,
and DTensor's for tensor parallelism. Rather than model that by hand,
memfit runs it: torch's fake process group (`init_process_group("fake")`)
lets this process be rank 0 of a world of any size, every collective a
no-op that allocates what the real one allocates, and the model's tensors
are fake (NOTE [simulated steps] in memfit.planning.simulation). The model
is copied to the meta device, parallelized with the user's
`parallelize(model, tp_mesh)` (tensor parallelism), checkpointed by memfit,
sharded by `fully_shard` (one group per memfit unit, NOTE [order with
FSDP2] in memfit.planning.distributed), and only then materialized as fake
tensors (`to_empty`): FSDP's 2-D mesh set-up cannot run on fake tensors.
The storage tracker then counts one rank's step. Nothing is ever
allocated for real, so a model far larger than this machine can be
planned for a cluster.

The fake process group is private torch API (`torch.testing._internal.
distributed.fake_pg`). `fake_world` sets aside a process group already
running (torchrun's) through c10d's private registry, and restores it.
If torch changes either, `private_api` says so in one sentence, and
tests/test_sharding.py fails at once, as for the checkpoint generator.

DDP cannot run on fake tensors (its C++ reducer reads the gradients'
data), so its rank is the one-process step plus the reducer's gradient
buckets: one more copy of the trainable parameters' gradients, allocated
when DDP is built (`ddp_timeline`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from memfit.errors import MemfitError

__all__ = ["Layout", "fake_world", "one_rank", "ddp_timeline"]

_REGISTRY = ("_pg_map", "_pg_names", "_pg_group_ranks", "_pg_backend_config", "_tags_to_pg", "_pg_to_tag")
DATA_PARALLEL = ("ddp", "fsdp")


def private_api():
    """torch's private pieces `fake_world` uses (NOTE [one rank simulated]): (c10d's module, its
    `_unregister_process_group`, the fake store class); one sentence if this torch lacks them."""
    try:
        from torch._C._distributed_c10d import _unregister_process_group
        from torch.distributed import distributed_c10d as c10d
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise MemfitError(
            f"memfit simulates distributed ranks with torch's fake process group, which this torch "
            f"({torch.__version__}) does not provide as memfit expects ({e}); use torch 2.13 or 2.14."
        ) from None
    if not all(hasattr(c10d, name) for name in (*_REGISTRY, "_world")):
        raise MemfitError(
            f"memfit sets a running process group aside through torch's c10d registry, which this torch "
            f"({torch.__version__}) keeps otherwise; use torch 2.13 or 2.14."
        )
    return c10d, _unregister_process_group, FakeStore


@dataclass(frozen=True)
class Layout:
    """How a run is spread over ranks: what memfit simulates one rank of.

    Args:
        kind: 'ddp' or 'fsdp' (FSDP2).
        world_size: every rank of the run: data-parallel ranks × `tp`.
        tp: tensor-parallel degree (FSDP only): a 2-D mesh of world_size // tp FSDP ranks × tp.
        parallelize: `parallelize(model, tp_mesh)` applies the tensor parallelism (required with tp > 1).
        param_dtype: FSDP2 mixed precision: the dtype of the gathered parameters and the compute (parameter
            shards, gradient reduction and optimizer state stay in the model's dtype); None: no casts.
        reshard_after_forward: FSDP2's option: free each unit's gathered parameters after its forward.
    """

    kind: str
    world_size: int
    tp: int = 1
    parallelize: Callable | None = None
    param_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True

    def __post_init__(self):
        if self.kind not in DATA_PARALLEL:
            raise MemfitError(f"unknown distributed kind {self.kind!r}; use ddp or fsdp.")
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise MemfitError(f"world size {self.world_size!r} must be a whole number of ranks, at least 1.")
        if self.tp < 1 or self.world_size % self.tp:
            raise MemfitError(f"tensor parallelism {self.tp} must divide the world size {self.world_size}.")
        if self.tp > 1 and (self.kind != "fsdp" or self.parallelize is None):
            raise MemfitError(
                "tensor parallelism needs distributed='fsdp' and parallelize=fn, where fn(model, tp_mesh) "
                "applies it (torch.distributed.tensor.parallel.parallelize_module)."
            )

    @property
    def dp(self) -> int:
        """The data-parallel ranks: each has its own share of the global batch."""
        return self.world_size // self.tp

    def __str__(self) -> str:
        if self.tp > 1:
            return f"FSDP {self.dp} × TP {self.tp}"
        return f"{self.kind.upper()} over {self.world_size} ranks"

    @classmethod
    def of(cls, distributed, **options) -> Layout | None:
        """A Layout from what the API takes: a Layout, ('ddp' | 'fsdp', world size), or a kind with
        `world_size=` and the other fields in `options`; None for one process."""
        if distributed is None or distributed == "none":
            return None
        if isinstance(distributed, Layout):
            return distributed
        if isinstance(distributed, tuple):
            kind, world = distributed
            return cls(kind, world, **options)
        if "world_size" not in options:
            raise MemfitError(f"distributed={distributed!r} needs world_size=N, the number of ranks to plan for.")
        return cls(distributed, **options)


@contextlib.contextmanager
def fake_world(size: int):
    """torch's fake process group of `size` ranks, this process its rank 0, as the default group while the
    block runs (NOTE [one rank simulated]). A process group already set up (torchrun's) is set aside and
    restored after."""
    c10d, unregister, store = private_api()
    saved = {name: getattr(c10d, name) for name in _REGISTRY}
    default, count, hook = c10d._world.default_pg, c10d._world.group_count, sys.excepthook
    for name in _REGISTRY:  # the fake groups' names go on from the real ones' count: no name is taken twice
        setattr(c10d, name, {})
    c10d._world.default_pg = None
    try:
        dist.init_process_group("fake", rank=0, world_size=size, store=store())
        yield
    finally:
        for name in c10d._pg_names.values():  # the fake groups' names only; the saved ones stay registered
            unregister(name)
        for name, value in saved.items():
            setattr(c10d, name, value)
        c10d._world.default_pg = default
        c10d._world.group_count = count  # the next real group gets the name it gets on every other rank
        sys.excepthook = hook  # init_process_group prefixes uncaught errors with "[rank0]:" from now on


def one_rank(model: nn.Module, layout: Layout, strategy, blocks, device: torch.device) -> nn.Module:
    """Rank 0 of `layout`, in a fake world (`fake_world`): `model` (on the meta device, not touched otherwise)
    copied, tensor-parallelized, checkpointed with `strategy` and sharded with FSDP2; still on the meta
    device, for `to_empty` to make it fake (or real) tensors."""
    from torch.distributed.device_mesh import init_device_mesh

    from memfit.core.wrapping import wrap
    from memfit.planning.distributed import shard

    # meshes named apart from any real one: DTensor caches sharding decisions by mesh, and a mesh is equal to
    # another of the same shape and names, whatever its process groups
    if layout.parallelize is not None:
        mesh = init_device_mesh(device.type, (layout.dp, layout.tp), mesh_dim_names=("memfit_dp", "memfit_tp"))
        layout.parallelize(model, mesh["memfit_tp"])
        mesh = mesh["memfit_dp"]
    else:
        mesh = init_device_mesh(device.type, (layout.world_size,), mesh_dim_names=("memfit_dp",))
    if strategy is not None:
        wrap(model, strategy, blocks=blocks)
    return shard(model, mesh, param_dtype=layout.param_dtype, reshard_after_forward=layout.reshard_after_forward)


def ddp_timeline(model: nn.Module, timeline: list) -> list:
    """One DDP rank's live bytes through a step: the one-process step's, plus DDP's gradient buckets (a copy of
    the trainable parameters' gradients, NOTE [one rank simulated])."""
    buckets = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return [(label, live + buckets) for label, live in timeline]
