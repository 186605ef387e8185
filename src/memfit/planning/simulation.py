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
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from memfit.core.blocks import find_blocks, with_calls
from memfit.core.memory import track_memory
from memfit.core.wrapping import SegmentWarning, wrap
from memfit.errors import scalar_loss

__all__ = ["simulate", "Simulation", "blocks_of", "count_calls", "each_call", "batch_dims"]


def copy_with(model, batch, convert, resize=None):
    """A copy of `model` and `batch` whose tensors are `convert(tensor)`:
    fake tensors (no real memory) or real CPU copies. `resize` = (batch
    size, positions of the batch's tensors whose first dimension is the
    batch): those get that many rows (for real copies, the batch's rows repeated)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(convert(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = convert(b)
    new_model = copy.deepcopy(model, memo)
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
    return new_model, tree_unflatten(new, spec)


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
    return t.detach().to("cpu", copy=True)


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
    `distributed`: ("ddp" | "fsdp", world size): the step of one rank of that
    run, `batch` being its share (see `memfit.planning.distributed.rank_timeline`)."""
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    mode = real_step(seed) if fake is None else fake
    fmodel, fbatch = copy_with(model, batch, on_cpu if fake is None else fake.from_tensor, resize)
    fmodel.train()
    if strategy is not None:
        wrap(fmodel, strategy, blocks=blocks)
    opt = (optimizer or torch.optim.AdamW)(fmodel.parameters())
    with mode, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SegmentWarning)
        for p in fmodel.parameters():  # create the optimizer state without a warm-up step
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with track_memory(fmodel, opt, fbatch, storage_tracker=True) as mem:
            hooks = _Marks([m for _, m in find_blocks(fmodel, blocks)], mem) if marks else None
            grads: dict = {}  # parameter -> (timeline position where its gradient appeared, its bytes)

            def arrived(p):
                grads.setdefault(id(p), (len(mem.timeline), p.grad.numel() * p.grad.element_size()))

            for p in fmodel.parameters() if distributed else ():
                p.register_post_accumulate_grad_hook(arrived)
            loss = scalar_loss(loss_fn, fmodel, fbatch)
            if hooks:
                hooks.remove()
            loss.backward()
            mem.mark("backward done")
            opt.step()
        unused = _state_bytes(opt, [p for p in fmodel.parameters() if p.requires_grad and p.grad is None])
    for w in caught:
        if not issubclass(w.category, SegmentWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    split = any(issubclass(w.category, SegmentWarning) for w in caught)
    if not distributed:
        timeline = [(label, live - unused) for label, live in mem.timeline]
        return Simulation(mem.peak_bytes - unused, mem.static_bytes - unused, timeline, split)
    from memfit.planning.distributed import rank_timeline

    state = sum(
        t.numel() * t.element_size() for t in tree_leaves(list(opt.state.values())) if isinstance(t, torch.Tensor)
    )
    # the copy, with the strategy simulated applied: its units are the FSDP groups (NOTE [order with FSDP2])
    kind, world = distributed
    timeline = rank_timeline(fmodel, kind, world, mem.timeline, list(grads.values()), mem.static_bytes, state)
    return Simulation(max(v for _, v in timeline), timeline[0][1], timeline, split)


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
