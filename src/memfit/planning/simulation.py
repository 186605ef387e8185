"""One training step's memory, simulated on fake tensors or run for real on a CPU copy, without touching the
model: the numbers every plan rests on.

NOTE [simulated steps]
Memory is profiled on a copy of the model whose parameters, buffers and batch
are fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`): every op
produces tensors with the right shapes, dtypes and storages but computes
nothing. The storage tracker counts exactly the storages a real step
allocates, so a simulated step's peak equals the real step's peak on CPU, to
the byte (tested), for a fraction of the compute, on any device, and without
touching the device's memory. The planner predicts the peak of the plan it
chose with the same simulation.

NOTE [the real path on fake tensors]
A library may branch on whether a tensor is fake, as it does for tracing:
transformers (5.x) does not read data it cannot read under torch.compile or
on fake tensors, so its check for packed sequences in the position ids
keeps a mask the real step drops (the tiny Llama's simulated peak was
+4.36% off). While a simulated step runs, `real_paths` answers that check
as the real step does for position ids the model makes itself from
`arange` (never packed). Position ids given in the batch keep the answer
on fake tensors, and where the simulation can be checked against a real
step (NOTE [real steps] in memfit.planning.profiling), a difference sends
memfit to real steps, and says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import sys
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from memfit.core.blocks import find_blocks, with_calls
from memfit.core.memory import track_memory
from memfit.core.wrapping import SegmentWarning, wrap
from memfit.errors import scalar_loss

__all__ = [
    "simulate",
    "Simulation",
    "blocks_of",
    "count_calls",
    "each_call",
    "batch_dims",
    "device_of",
    "faking",
    "real_paths",
]


def copy_with(model, batch, convert, resize=None):
    """A copy of `model` and `batch` whose tensors are `convert(tensor)`: fake tensors (no real memory) or
    real CPU copies (`copy_model`, `copy_batch`)."""
    return copy_model(model, convert), copy_batch(batch, convert, resize)


def copy_model(model, convert):
    """A copy of `model` whose parameters and buffers are `convert(tensor)` (ties kept)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(convert(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = convert(b)
    return copy.deepcopy(model, memo)


def copy_batch(batch, convert, resize=None):
    """`batch` with its tensors `convert(tensor)`. `resize` = (batch size, positions of the batch's tensors
    whose first dimension is the batch): those get that many rows (for real copies, the batch's rows
    repeated)."""
    leaves, spec = tree_flatten(batch)
    new = [convert(t) if isinstance(t, torch.Tensor) else t for t in leaves]
    if resize:
        size, dims = resize
        for i in dims:
            t = new[i]
            if isinstance(t, FakeTensor):
                with t.fake_mode:
                    new[i] = torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
            else:
                new[i] = t[torch.arange(size) % t.shape[0]]
    return tree_unflatten(new, spec)


def count_calls(model, batch, loss_fn) -> dict:
    """Where each module of `model` is called in one forward (with the loss):
    {qualified name: positions of its calls in the sequence of all module
    calls}, from a step on fake tensors, or {} if the step cannot run on them
    (NOTE [blocks called several times] in memfit.core.blocks)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fmodel, fbatch = copy_with(model, batch, mode.from_tensor)
    names = {id(m): n for n, m in fmodel.named_modules()}
    calls: dict = {}
    sequence = itertools.count()

    def called(module, args):
        if id(module) in names:
            calls.setdefault(names[id(module)], []).append(next(sequence))

    fmodel.train()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(called)
    try:
        with mode, torch.no_grad():
            loss_fn(fmodel, fbatch)
    except Exception:
        return {}
    finally:
        handle.remove()
    return calls


def blocks_of(model, batch, loss_fn, blocks=None):
    """`blocks`, with each call of a block called several times per step a block of its own
    (`memfit.core.blocks.with_calls`)."""
    if blocks is not None and not isinstance(blocks, str) and any("#" in n for n in blocks):
        return blocks  # the calls are named already (a plan's blocks)
    return with_calls(model, blocks, count_calls(model, batch, loss_fn))


def on_cpu(t):
    """A real CPU copy of `t`; a view is copied with the whole tensor it views (as a fake tensor keeps it), so
    that the copy holds the bytes the step holds: a rank's slice of the global batch holds all of it."""
    if t._base is None:
        return t.detach().to("cpu", copy=True)
    base = t._base.detach().to("cpu", copy=True)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def batch_dims(small, larger) -> list[int]:
    """Positions of the tensors whose first dimension differs between two
    batches of different sizes: the ones that carry the batch dimension."""
    a, b = tree_leaves(small), tree_leaves(larger)
    return [
        i for i, (x, y) in enumerate(zip(a, b)) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != y.shape[0]
    ]


def each_call(chain, pre, post) -> list:
    """Forward hooks on the blocks of `chain` (modules in order; a module called several times per step is there
    once per call, NOTE [blocks called several times]): `pre(i)` before and `post(i, out)` after the call that is
    the chain's i-th block. Returns the hooks' handles."""
    positions: dict = {}
    for i, m in enumerate(chain):
        positions.setdefault(id(m), (m, []))[1].append(i)
    handles = []
    for m, at in positions.values():
        calls = iter(at)
        running: list[int | None] = []

        def before(module, args, calls=calls, running=running):
            running.append(next(calls, None))
            if running[-1] is not None:
                pre(running[-1])

        def after(module, args, out, running=running):
            i = running.pop()
            if i is not None:
                post(i, out)

        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    return handles


class _Marks:
    """Marks each block's forward start "f<i" and end "f>i" in the tracker's
    timeline, and, through a hook on its output's gradient, the start of its
    backward "b<i". Only for the forward: `remove()` before backward."""

    def __init__(self, chain, mem):
        self.mem = mem
        self.handles = each_call(chain, self._pre, self._post)

    def _pre(self, i):
        self.mem.mark(f"f<{i}")

    def _post(self, i, out):
        self.mem.mark(f"f>{i}")
        t = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        if t is not None and t.requires_grad:
            t.register_hook(lambda grad: self.mem.mark(f"b<{i}"))

    def remove(self):
        for h in self.handles:
            h.remove()


SIMULATED = "simulated (fake tensors)"
MEASURED = "measured (real steps on a CPU copy)"


@dataclass
class Simulation:
    peak_bytes: int
    static_bytes: int
    timeline: list  # (label, live bytes)
    split: bool = False  # a segment was recomputed in parts (its blocks cannot form segments)
    # what the rank holds, in bytes: parameters (its shards), gradients (after backward), optimizer state, and
    # the activations kept for backward (live at the end of the forward beyond the static bytes)
    parts: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def real_step(seed):
    """A real step that leaves the caller's RNG as it was (seeded with `seed` if given)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def simulate(
    model,
    batch,
    loss_fn,
    strategy,
    *,
    blocks=None,
    optimizer=None,
    marks=False,
    resize=None,
    distributed=None,
    real=False,
    seed=None,
) -> Simulation:
    """Peak memory of one training step with `strategy` applied (None: as the
    model is wrapped now), with the optimizer state in place as after a first
    step, computed on fake tensors, or with `real=True` by a real step on a
    CPU copy (see NOTE [real steps] in memfit.planning.profiling). The model itself is not touched.
    `resize`: see `copy_with` (a batch of any size, without making one).
    `distributed`: a `memfit.planning.sharding.Layout` (or what `Layout.of` takes): the step of one rank of
    that run, `batch` being its share (NOTE [one rank simulated] in memfit.planning.sharding)."""
    from memfit.planning.sharding import Layout, ddp_timeline, fake_world

    layout = Layout.of(distributed)
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    sharded = layout is not None and layout.kind == "fsdp"
    with fake_world(layout.world_size) if layout is not None and sharded else contextlib.nullcontext():
        fmodel, fbatch = _rank_copy(model, batch, fake, resize, layout, strategy, blocks)
        mem, opt, split = _step(fmodel, fbatch, loss_fn, optimizer, fake or real_step(seed), blocks, marks)
    unused = _state_bytes(opt, [p for p in fmodel.parameters() if p.requires_grad and p.grad is None])
    timeline = [(label, live - unused) for label, live in mem.timeline]
    if layout is not None and layout.kind == "ddp":
        timeline = ddp_timeline(fmodel, timeline)
    parts = {
        "parameters": _storage_bytes(fmodel.parameters()),
        "gradients": _storage_bytes(p.grad for p in fmodel.parameters() if p.grad is not None),
        "optimizer_state": _storage_bytes(tree_leaves(list(opt.state.values()))) - unused,
        "activations": mem.activation_bytes,
    }
    return Simulation(max(v for _, v in timeline), mem.static_bytes - unused, timeline, split, parts)


def _storage_bytes(tensors) -> int:
    """Bytes of the storages `tensors` use, each once; of a DTensor, the local shard's."""
    seen: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _rank_copy(model, batch, fake, resize, layout, strategy, blocks) -> tuple:
    """The copy of `model` and `batch` a simulated step runs (fake tensors, or real CPU tensors without
    `fake`), `strategy` applied; for FSDP, rank 0's shards (NOTE [one rank simulated])."""
    device = device_of(model)
    convert = on_cpu if fake is None else faking(fake, device)
    if layout is None or layout.kind != "fsdp":
        fmodel, fbatch = copy_with(model, batch, convert, resize)
        if strategy is not None:
            wrap(fmodel, strategy, blocks=blocks)
        return fmodel.train(), fbatch
    from memfit.planning.sharding import one_rank

    fbatch = copy_batch(batch, convert, resize)
    meta = copy_model(model, lambda t: t.to("meta")).train()
    fmodel = one_rank(meta, layout, strategy, blocks, device if fake else torch.device("cpu"))
    with fake or contextlib.nullcontext():
        fmodel.to_empty(device=device if fake else "cpu")
    return fmodel, fbatch


def device_of(model) -> torch.device:
    """Where the model trains: its parameters' device (a model on the meta device is simulated on the CPU)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    return torch.device("cpu") if device.type == "meta" else device


def faking(fake: FakeTensorMode, device: torch.device):
    """A tensor's fake twin; a meta tensor's is made on `device` (a model too big for this machine)."""

    def convert(t):
        if t.device.type != "meta":
            return fake.from_tensor(t)
        with fake:
            return torch.empty(t.shape, dtype=t.dtype, device=device)

    return convert


@contextlib.contextmanager
def real_paths(fbatch):
    """NOTE [the real path on fake tensors]: while a simulated step runs, transformers' check for packed
    sequences answers as on real tensors for position ids the model makes itself (from `arange`: not
    packed). Position ids that come from the batch keep transformers' answer on fake tensors."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None or not hasattr(masking, "find_packed_sequence_indices"):
        yield
        return
    original = masking.find_packed_sequence_indices
    from_batch = {id(t) for t in tree_leaves(fbatch) if isinstance(t, torch.Tensor)}

    def find_packed_sequence_indices(position_ids):
        found = original(position_ids)  # its ops run, as in the real step
        made_here = id(position_ids) not in from_batch and id(position_ids._base) not in from_batch
        return None if isinstance(position_ids, FakeTensor) and made_here else found

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def _step(fmodel, fbatch, loss_fn, optimizer, mode, blocks, marks) -> tuple:
    """One tracked training step of a copy, with the optimizer state made first (as after a first step):
    (the tracker, the optimizer, whether a segment was recomputed in parts)."""
    opt = (optimizer or torch.optim.AdamW)(fmodel.parameters())
    with mode, real_paths(fbatch), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SegmentWarning)
        for p in fmodel.parameters():  # create the optimizer state without a warm-up step
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with track_memory(fmodel, opt, fbatch, storage_tracker=True) as mem:
            hooks = _Marks([m for _, m in find_blocks(fmodel, blocks)], mem) if marks else None
            loss = scalar_loss(loss_fn, fmodel, fbatch)
            if hooks:
                hooks.remove()
            loss.backward()
            mem.mark("backward done")
            opt.step()
    for w in caught:
        if not issubclass(w.category, SegmentWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return mem, opt, any(issubclass(w.category, SegmentWarning) for w in caught)


def _state_bytes(opt, params) -> int:
    """Bytes of the optimizer state of `params`. The simulation creates every
    trainable parameter's state up front; a real first step creates it only
    for those that got a gradient, so the state of a parameter the step never
    reaches (a head the loss does not use, a layer LayerDrop skipped) is left
    out of the simulated step's numbers."""
    return sum(
        t.numel() * t.element_size()
        for p in params
        for t in tree_leaves(opt.state.get(p, {}))
        if isinstance(t, torch.Tensor)
    )
