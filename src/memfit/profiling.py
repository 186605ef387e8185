"""What each block costs under each strategy: bytes kept through the forward,
bytes needed at its backward, FLOPs and time. The planner's input.

NOTE [simulated steps]
Memory is profiled on a copy of the model whose parameters, buffers and batch
are fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`): every op
produces tensors with the right shapes, dtypes and storages but computes
nothing. The storage tracker counts exactly the storages a real step
allocates, so a simulated step's peak equals the real step's peak on CPU, to
the byte (tested), for a fraction of the compute, on any device, and without
touching the device's memory. The planner predicts the peak of the plan it
chose with the same simulation.

NOTE [real steps]
Some steps cannot be simulated: ops whose output depends on values
(`.item()`, `nonzero`, LayerDrop's `if torch.rand([]) < p`), fake kernels
stricter than the real ones (`aten._grouped_mm` wants bf16), or models that
take another code path when they see fake tensors (transformers builds an
attention mask it would skip for real inputs). So `profile` simulates the
plain step and, for a model on the CPU, also runs it for real; if the
simulation fails or differs from the real step by a byte, every step the
planner needs is then run for real on a CPU copy of the model, with the same
storage tracker (exact, at the cost of compute), and the plan says so
(`Profile.memory_source`). Where the real step is simply faster than
the simulation (small models: fake tensors cost Python per op), real steps
are used too. A model that skips blocks at random is profiled
on a step in which every block ran (the first of a few seeds that gives
one): its steps that skip blocks peak lower than predicted.

NOTE [blocks without a backward]
A block run without grad (a frozen EMA teacher, the target encoder of a
JEPA, frozen first layers whose input needs no gradient) saves nothing and
has no backward, so checkpointing it does nothing, and the peak model, whose
terms follow the blocks' backward, has no place for it. Such blocks (seen in
the plain step: no gradient reached their output) are left out of the
profile and the plan's choice (`Profile.fixed`), and the plan lists them as
`keep`.

Costs come from each block's ops, recorded in the plain step (`record_ops`):
in FLOPs, the matmul FLOPs plus one per element of the other ops that a mode
recomputes; in time, what the device's time model (memfit.timemodel) says
those ops take, plus a policy's cost on each op for the selective modes. No
step is run on the model itself.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from memfit import pruning, strategies
from memfit.blocks import find_blocks, find_chains, with_calls
from memfit.errors import MemfitError, scalar_loss
from memfit.flops import op_flops
from memfit.memory import available_cpu_bytes, track_memory
from memfit.strategies import (
    KEEP,
    MODES,
    OFFLOAD,
    POINTWISE,
    RECOMPUTE,
    SCORES,
    SELECTIVE,
    Unit,
)
from memfit.timemodel import calibrate
from memfit.wrapping import SegmentWarning, apply

__all__ = ["profile", "simulate", "Profile", "coverage"]

UNIFORM = {KEEP: "none", RECOMPUTE: "blocks", SELECTIVE: "selective", SCORES: "scores", POINTWISE: "pointwise",
           OFFLOAD: "offload"}
HOST_MODES = tuple(m for m in MODES if m != OFFLOAD)


def modes_for(device) -> tuple:
    """The modes worth profiling on `device`: offloading to the CPU only helps a model on CUDA."""
    return MODES if torch.device(device).type == "cuda" else HOST_MODES


def _copy(model, batch, convert, resize=None):
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
    (NOTE [blocks called several times] in memfit.blocks)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fmodel, fbatch = _copy(model, batch, mode.from_tensor)
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
    except Exception:  # noqa: BLE001 - see NOTE [real steps]: the blocks found without a trace stand
        return {}
    finally:
        handle.remove()
    return calls


def blocks_of(model, batch, loss_fn, blocks=None):
    """`blocks`, with each call of a block called several times per step a block of its own
    (`memfit.blocks.with_calls`)."""
    if blocks is not None and not isinstance(blocks, str) and any("#" in n for n in blocks):
        return blocks  # the calls are named already (a plan's blocks)
    return with_calls(model, blocks, count_calls(model, batch, loss_fn))


def _on_cpu(t):
    return t.detach().to("cpu", copy=True)


def batch_dims(small, larger) -> list[int]:
    """Positions of the tensors whose first dimension differs between two
    batches of different sizes: the ones that carry the batch dimension."""
    a, b = tree_leaves(small), tree_leaves(larger)
    return [i for i, (x, y) in enumerate(zip(a, b))
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != y.shape[0]]


def each_call(chain, pre, post) -> list:
    """Forward hooks on the blocks of `chain` (modules in order; a module called several times per step is there
    once per call, NOTE [blocks called several times]): `pre(i)` before and `post(i, out)` after the call that is
    the chain's i-th block. Returns the hooks' handles."""
    positions: dict = {}
    for i, m in enumerate(chain):
        positions.setdefault(id(m), (m, []))[1].append(i)
    handles = []
    for m, at in positions.values():
        calls, running = iter(at), []

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
def _real_step(seed):
    """A real step that leaves the caller's RNG as it was (seeded with `seed` if given)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def simulate(model, batch, loss_fn, strategy, *, blocks=None, optimizer=None, marks=False,
             resize=None, distributed=None, real=False, seed=None) -> Simulation:
    """Peak memory of one training step with `strategy` applied (None: as the
    model is wrapped now), with the optimizer state in place as after a first
    step, computed on fake tensors, or with `real=True` by a real step on a
    CPU copy (see NOTE [real steps]). The model itself is not touched.
    `resize`: see `_copy` (a batch of any size, without making one).
    `distributed`: ("ddp" | "fsdp", world size): the step of one rank of that
    run, `batch` being its share (see `memfit.distributed.rank_timeline`)."""
    mode = _real_step(seed) if real else FakeTensorMode(allow_non_fake_inputs=True)
    fmodel, fbatch = _copy(model, batch, _on_cpu if real else mode.from_tensor, resize)
    fmodel.train()
    if strategy is not None:
        apply(fmodel, strategy, blocks=blocks)
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
            grads = {}  # parameter -> (timeline position where its gradient appeared, its bytes)

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
    from memfit.distributed import rank_timeline
    state = sum(t.numel() * t.element_size() for t in tree_leaves(list(opt.state.values()))
                if isinstance(t, torch.Tensor))
    # the copy, with the strategy simulated applied: its units are the FSDP groups (NOTE [order with FSDP2])
    timeline = rank_timeline(fmodel, *distributed, mem.timeline, list(grads.values()), mem.static_bytes, state)
    return Simulation(max(v for _, v in timeline), timeline[0][1], timeline, split)


def _state_bytes(opt, params) -> int:
    """Bytes of the optimizer state of `params`. The simulation creates every
    trainable parameter's state up front; a real first step creates it only
    for those that got a gradient, so the state of a parameter the step never
    reaches (a head the loss does not use, a layer LayerDrop skipped) is left
    out of the simulated step's numbers."""
    return sum(t.numel() * t.element_size() for p in params for t in tree_leaves(opt.state.get(p, {}))
               if isinstance(t, torch.Tensor))


@dataclass
class Op:
    """One op of a block's forward, as the selective-checkpoint dispatch mode
    sees it (NOTE [op-level modes] in memfit.strategies)."""

    name: str
    flops: int           # matmul, convolution and attention FLOPs (the FLOP counter's)
    elements: int        # elements it produces, if it does no matrix work and is no view: the FLOP cost's 1 each
    moved: int           # bytes it reads and writes (0 for a view)
    new_bytes: int       # bytes of the storages it creates
    random: bool         # it draws random numbers (NOTE [random ops])
    presets: frozenset   # the preset modes that save its output
    saveable: bool = True  # its output can be saved: a new storage that no later op of the block writes in place


class _OpRecorder(TorchDispatchMode):
    """Every op of a training step: the step's totals (FLOPs, bytes moved,
    ops: what the time model needs), and inside each block's forward each op
    the selective-checkpoint mode would see, as an `Op`, with the block's
    dataflow (`flows[i]`, NOTE [pruned recompute] in memfit.pruning: what each
    op reads, what autograd saves, and `last`, the op after which it saved
    the last tensor: a recompute stops there, torch's early stop)."""

    def __init__(self, n):
        super().__init__()
        self.blocks, self.flows = [[] for _ in range(n)], [pruning.Dataflow() for _ in range(n)]
        self.block = None  # the block whose forward runs
        self.flops = self.moved = self.count = 0

    def saved(self, tensor):  # a saved-tensor pack hook
        if self.block is not None:
            self.flows[self.block].packed(tensor)
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in pruning.IGNORED:
            return out
        if func in strategies.UNNUMBERED:
            if self.block is not None:
                self.flows[self.block].unnumbered(args, kwargs)
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        view = getattr(func, "is_view", False)
        flops = op_flops(func, args, kwargs, out)
        moved = 0 if view else sum(t.numel() * t.element_size() for t in ins + outs)
        self.flops, self.moved, self.count = self.flops + flops, self.moved + moved, self.count + 1
        if self.block is None:
            return out
        ops = self.blocks[self.block]
        flow = self.flows[self.block].add(func, args, kwargs, out)
        for k in flow.wrote:  # an output written in place later cannot be saved
            ops[k].saveable = False
        inputs = {id(t.untyped_storage()) for t in ins}
        new = {} if view else {id(s): s for t in outs if id(s := t.untyped_storage()) not in inputs}
        elements = 0 if view or func in strategies.MATRIX_OPS else sum(t.numel() for t in outs)
        presets = frozenset(m for m, decide in strategies.PRESETS.items() if decide(len(ops), func, args))
        ops.append(Op(strategies.op_name(func), flops, elements, moved, sum(st.nbytes() for st in new.values()),
                      strategies.draws_random(func, args, kwargs), presets, saveable=bool(new)))
        return out


def record_ops(model, batch, loss_fn, *, blocks=None, real=False, seed=None) -> _OpRecorder:
    """The ops of a plain training step (`_OpRecorder`), on fake tensors, so
    deterministic and cheap, or on a real step (see NOTE [real steps])."""
    mode = _real_step(seed) if real else FakeTensorMode(allow_non_fake_inputs=True)
    fmodel, fbatch = _copy(model, batch, _on_cpu if real else mode.from_tensor)
    apply(fmodel, "none", blocks=blocks)  # as every step memfit runs: no KV cache (NOTE [no KV cache])
    fmodel.train()
    chain = [m for _, m in find_blocks(fmodel, blocks)]
    rec = _OpRecorder(len(chain))

    def enter(i):
        rec.block, rec.flows[i] = i, pruning.Dataflow()

    def leave(i, out):
        rec.block = None
    handles = each_call(chain, enter, leave)
    with mode, rec, torch.autograd.graph.saved_tensors_hooks(rec.saved, lambda t: t):
        loss = loss_fn(fmodel, fbatch)
        for h in handles:
            h.remove()
        loss.backward()
    return rec


@dataclass
class Profile:
    """Per-block costs, as the planner's peak model uses them (bytes, FLOPs, seconds).

    The peak model, for units u (a block, or a segment of blocks [a, b)):
      forward end:   start + sum(kept) + head <= budget
      backward of u: start + sum(kept of units before u) + other[b-1] + work(u) <= budget
      after:         tail <= budget
    `start` is what is live when the first block starts (static bytes, batch,
    the stem's activations); `other[i]` what else is live when block i's
    backward starts (gradients of later blocks' parameters, the gradient
    flowing back); `kept[m][i]` what block i adds to the live bytes in its
    forward under mode m; `work[m][i]` how far the live bytes rise during its
    backward; `head` the rise between the last block and the start of
    backward; `tail` the peak after the blocks' backward (the stem's backward
    and the optimizer step).

    The modes m are labels: `keep`, `recompute`, the presets, `offload`, and
    the op-level frontier's points `ops/1`, `ops/2`, ..., which stand for a
    mode of each block's own (`points[label][i]`, an `ops:...` mode: NOTE
    [op-level frontier]). `costs[kind][m][i]` is what recomputing block i
    under m costs: `flops` (matmul FLOPs plus one per element of the other
    ops) or `time` (seconds, NOTE [time model] in memfit.timemodel);
    `recomputed[m][i]` its matmul FLOPs alone.
    """

    names: list
    device: str
    baseline_peak_bytes: int
    static_bytes: int
    start: int
    head: int
    tail: int
    other: list
    kept: dict
    work: dict
    transient: dict       # rise inside each block's forward, per mode
    costs: dict           # kind -> mode -> per block
    recomputed: dict      # mode -> per block: matmul FLOPs recomputed
    step_flops: int       # FLOPs of a plain training step
    step_time_s: float | None = None  # a plain step, predicted by the time model
    modes: tuple = HOST_MODES  # the modes profiled (offload only on CUDA), op-level points included
    points: dict = field(default_factory=dict)  # op-level label -> each block's ops:... mode
    time_model: object = None  # the memfit.timemodel.TimeModel the time costs come from
    memory_source: str = SIMULATED  # or MEASURED: see NOTE [real steps]
    uniform_peaks: dict | None = None  # the simulated peak of each mode used for every block
    real_steps_because: str | None = None
    seed: int | None = None        # the RNG seed of the real steps
    segments: bool = True          # whether the chains' blocks can be recomputed as segments
    chains: list | None = None     # the length of each chain, in the order of `names`
    coverage: float | None = None  # share of the plain step's saved activations inside the blocks
    fixed: list = field(default_factory=list)  # blocks left plain: they have no backward (not in `names`)

    @property
    def chain_sizes(self) -> list:
        return self.chains or [len(self.names)]

    def label(self, mode: str, i: int) -> str:
        """The mode's label in the tables: itself, or for an `ops:...` mode of block i its point's."""
        if not strategies.is_ops(mode):
            return mode
        return next(label for label, per_block in self.points.items() if per_block[i] == mode)

    def mode(self, label: str, i: int) -> str:
        """The mode block i is applied with under `label`."""
        return self.points[label][i] if label in self.points else label

    def recomputed_flops(self, mode: str, i: int) -> int:
        """Matmul / convolution / attention FLOPs recomputed for block i."""
        return self.recomputed[self.label(mode, i)][i]

    def cost(self, mode: str, i: int, kind: str) -> float:
        """What recomputing block i under `mode` costs: FLOPs or seconds."""
        return self.costs[kind][self.label(mode, i)][i]

    def step_cost(self, kind: str) -> float:
        return float(self.step_flops) if kind == "flops" else self.step_time_s


def saved_by(mode: str, ops: list) -> set:
    """The indices of the ops whose outputs `mode` saves, NOTE [random ops] applied."""
    if mode == KEEP:
        return set(range(len(ops)))
    if strategies.is_lazy(mode):  # recomputed on demand, which holds every random op's output
        named = strategies.saved_ops(mode)
        return {k for k, op in enumerate(ops) if op.random or named.get(k) == op.name}
    if strategies.is_ops(mode):
        saved = {k for k, name in strategies.saved_ops(mode).items() if k < len(ops) and ops[k].name == name}
    else:
        saved = {k for k, op in enumerate(ops) if mode in op.presets}
    drawn = False
    for k, op in enumerate(ops):  # the rule the policy applies as the forward runs
        save, drawn = strategies.random_rule(k in saved, op.random, drawn)
        if save:
            saved.add(k)
    return saved


def _op_cost(op: Op, kind: str, model) -> float:
    return op.flops + op.elements if kind == "flops" else model.seconds(op.flops, op.moved)


def _recomputed(mode, ops, flow) -> list:
    """The ops a recompute under `mode` runs again: those it does not save, up to the last one whose output
    backward needs (torch's early stop), but for a selective mode only those that backward needs (NOTE
    [pruned recompute] in memfit.pruning)."""
    saved = saved_by(mode, ops)
    skip = set()
    if mode not in (KEEP, RECOMPUTE) and not flow.opaque:
        skip = pruning.skipped(flow.ops, flow.roots, flow.last, saved)
    return [op for k, op in enumerate(ops[:flow.last + 1]) if k not in saved and k not in skip]


def _block_costs(mode, ops, flow, kind, model) -> float:
    """What recomputing a block's ops under `mode` costs; in time, a policy's cost on each op too (NOTE [time
    model])."""
    policy = model.per_policy_op * len(ops) if kind == "time" and mode not in (KEEP, RECOMPUTE) else 0.0
    return policy + sum(_op_cost(op, kind, model) for op in _recomputed(mode, ops, flow))


# NOTE [op-level frontier]
# Between keeping a block's activations and recomputing them all lie the
# choices of which of its ops' outputs to save. Were every op it has not
# saved re-run (up to the last one backward needs), each op would be an item:
# saving it costs the bytes of the storage it creates and saves its recompute
# cost (its FLOPs plus one per element, or its time). The exact Pareto
# frontier of (bytes saved, cost avoided) over a block's items is a knapsack,
# computed here by merging and pruning lists of points. The recompute skips
# the ops nothing needs (NOTE [pruned recompute] in memfit.pruning), so
# saving an op can also spare the ops before it: each point is priced by the
# pruned recompute, outputs saved that nothing reads are dropped from it, and
# a greedy walk that saves, step by step, the op sparing the most cost per
# byte adds the points the knapsack cannot see. Of them all, the points that leave
# `FRONTIER` shares of the block's whole recompute cost (falling by 0.7 from
# 0.6: the planner trades memory against small costs) become modes `ops:...`
# for that block, and their twins `lazy:...` (NOTE [recompute on demand] in
# memfit.ondemand); each block of the chain gets its own. The `ops:` points
# are not simulated one by one: their terms in the planner's peak model come
# from `recompute`'s, the bytes of the outputs saved added to what the block
# keeps and taken off what its backward rematerialises, but no lower than
# `keep`'s (`_estimate`: what a point keeps is exact on GPT and Llama blocks,
# its backward's rise exact or above, 2026-12-02). A `lazy:` point's backward
# rise depends on which recomputed tensors overlap, which no such estimate
# follows (from 1.5x below to 3.3x above `keep`'s rise plus its two largest
# recomputed outputs on GPT and Llama), so each is simulated, as the presets
# are; blocks alike share a point's terms, so one simulated step runs a
# different point on each of them (`_each_point`). The plan the planner picks is then
# simulated whole, as every plan is (NOTE [exact, then checked] in
# memfit.planner): the peak it predicts never rests on the estimate.
# Ops that cannot be saved: views and in-place ops (no storage of their own),
# outputs written in place later (torch's cache refuses them), random ops
# (NOTE [random ops]: saving them would force saving later ones).
FRONTIER = tuple(0.6 * 0.7 ** k for k in range(15))  # 0.6 down to 0.004


def frontier(ops: list, flow, kind: str, model=None, shares=FRONTIER) -> list[str]:
    """The distinct `ops:...` modes of a block that leave these shares of its recompute cost, fewest bytes
    first; `flow` is the block's `memfit.pruning.Dataflow`."""
    last, price = flow.last, [_op_cost(op, kind, model) for op in ops]
    items = [(k, op.new_bytes, price[k]) for k, op in enumerate(ops[:last + 1])
             if op.saveable and not op.random and op.new_bytes > 0 and price[k] > 0]
    names = {k: op.name for k, op in enumerate(ops)}
    pareto = [(0, 0.0, frozenset())]  # (bytes, cost avoided, ops saved), bytes ascending, cost strictly rising
    total = sum(b for _, b, _ in items)
    for k, b, c in items:
        merged = sorted(pareto + [(pb + b, pc + c, ps | {k}) for pb, pc, ps in pareto], key=lambda p: (p[0], -p[1]))
        pareto = []
        for p in merged:
            if not pareto or p[1] > pareto[-1][1]:
                pareto.append(p)
        if len(pareto) > 256:  # thin: the first point of each 1/256 of the bytes
            bucket = [int(p[0] * 256 / total) for p in pareto]
            pareto = [p for j, p in enumerate(pareto) if j == 0 or bucket[j] != bucket[j - 1]]
    found = {_pruned(ps, flow, price) for _, _, ps in pareto} | _greedy(items, flow, price)
    points = []  # (bytes, cost left, ops saved): bytes ascending, cost strictly falling
    for b, c, ps in sorted((sum(ops[k].new_bytes for k in ps), c, ps) for ps, c in found):
        if not points or c < points[-1][1]:
            points.append((b, c, ps))
    modes, whole = [], sum(price[:last + 1])
    for share in shares:  # the fewest bytes that leave at most this share of the block's recompute cost
        best = next((p for p in points if p[1] <= share * whole), points[-1])
        mode = strategies.ops_mode({k: names[k] for k in best[2]})
        if best[2] and mode not in modes:
            modes.append(mode)
    return modes


def _pruned(saved, flow, price) -> tuple:
    """(the ops of `saved` the recompute uses, what it costs) for a block whose
    recompute takes `saved` from the cache and skips what nothing needs (NOTE
    [pruned recompute]): a saved output that nothing reads is not worth its bytes."""
    last = flow.last
    if flow.opaque:
        return frozenset(saved), sum(c for k, c in enumerate(price[:last + 1]) if k not in saved)
    need = pruning.needed(flow.ops, flow.roots, last, saved)
    used = frozenset(k for k in saved if k in need or flow.ops[k].kind not in (pruning.FRESH, pruning.INPLACE))
    skip = pruning.skipped(flow.ops, flow.roots, last, used)
    return used, sum(c for k, c in enumerate(price[:last + 1]) if k not in used and k not in skip)


def _greedy(items, flow, price) -> set:
    """Points the knapsack, whose items are independent, cannot see: saving an
    op can spare the ops before it that only it needed. From nothing saved,
    save at each step the op that spares the most cost per byte."""
    saved, cost = _pruned(frozenset(), flow, price)
    points = set()
    while True:
        steps = [(c, -b, k, s) for k, b, _ in items if k not in saved
                 for s, c in [_pruned(saved | {k}, flow, price)] if c < cost]
        if not steps:
            return points
        _, _, _, saved = min(steps, key=lambda t: ((t[0] - cost) / -t[1], t[2]))
        cost = _pruned(saved, flow, price)[1]
        points.add((saved, cost))


def _alike(rec) -> list:
    """Each block's key: blocks with the same key ran the same ops on the same dataflow (a transformer's layers)."""
    return [(tuple((dataclasses.astuple(op), f) for op, f in zip(rec.blocks[i], flow.ops)), frozenset(flow.roots),
             flow.last, flow.opaque) for i, flow in enumerate(rec.flows)]


def _frontiers(rec, kind, model) -> list:
    """Each block's `frontier`, worked out once for blocks alike."""
    known = {}
    return [known[k] if k in known else known.setdefault(k, frontier(rec.blocks[i], rec.flows[i], kind, model))
            for i, k in enumerate(_alike(rec))]


def _costs(points: dict, reads: dict, rec, model) -> tuple:
    """(costs[kind][mode][i], recomputed matmul FLOPs[mode][i]) from the ops recorded (`_block_costs`)."""
    n = len(rec.blocks)
    mode_of = lambda m, i: points[m][i] if m in points else m  # noqa: E731
    costs = {kind: {m: [_block_costs(mode_of(m, i), rec.blocks[i], rec.flows[i], kind, model) for i in range(n)]
                    for m in reads if m != OFFLOAD} for kind in (("flops", "time") if model else ("flops",))}
    costs["flops"][OFFLOAD] = [float("inf")] * n
    if model and OFFLOAD in reads:  # to the host and back: NOTE [time model]
        costs["time"][OFFLOAD] = [2 * k * (model.per_offloaded_byte or 0) for k in reads[KEEP]["kept"]]
    recomputed = {m: [sum(op.flops for op in _recomputed(mode_of(m, i), rec.blocks[i], rec.flows[i]))
                      for i in range(n)] for m in reads if m != OFFLOAD}
    recomputed[OFFLOAD] = [0] * n
    return costs, recomputed


def _estimate(points: dict, reads: dict, rec) -> dict:
    """The peak model's terms of each op-level point, from `recompute`'s
    (NOTE [op-level frontier]): its outputs saved add their bytes to what the
    block keeps and take them off what its backward rematerialises; the rise
    inside the forward is taken as recompute's plus all of them (an upper bound)."""
    rc = reads[RECOMPUTE]
    out = {}
    for label, modes in points.items():
        extra = [sum(rec.blocks[i][k].new_bytes for k in saved_by(m, rec.blocks[i])) if strategies.is_ops(m) else 0
                 for i, m in enumerate(modes)]
        out[label] = {"kept": [k + e for k, e in zip(rc["kept"], extra)],
                      "work": [max(w - e, wk) for w, e, wk in zip(rc["work"], extra, reads[KEEP]["work"])],
                      "transient": [t + e for t, e in zip(rc["transient"], extra)]}
    return out


def _read(sim: Simulation, n: int):
    """Per-block quantities out of a simulated step's timeline of marks."""
    at = {label: k for k, (label, _) in enumerate(sim.timeline)}
    live = [v for _, v in sim.timeline]
    # A block run without grad (a frozen EMA target encoder) has no backward: it is taken to start its
    # backward at the end of the step, with nothing to do; the blocks' backward as a whole starts at the first.
    done = at["backward done"]
    b = [at.get(f"b<{i}", done) for i in range(n)]
    kept = [live[at[f"f>{i}"]] - live[at[f"f<{i}"]] for i in range(n)]
    transient = [max(live[at[f"f<{i}"]:at[f"f>{i}"] + 1]) - live[at[f"f<{i}"]] for i in range(n)]
    backward_start = [live[b[i]] for i in range(n)]
    ends = [b[i - 1] if i and b[i - 1] != done else min((k for k in b if k > b[i]), default=done) for i in range(n)]
    work = [max(live[b[i]:max(ends[i], b[i]) + 1]) - backward_start[i] for i in range(n)]
    start = live[at["f<0"]]
    head = max(live[at[f"f>{n - 1}"]:min(b) + 1]) - live[at[f"f>{n - 1}"]] if b[n - 1] == done else \
        max(live[at[f"f>{n - 1}"]:b[n - 1] + 1]) - live[at[f"f>{n - 1}"]]
    tail = max(live[at["backward done"]:])
    return dict(kept=kept, transient=transient, backward_start=backward_start, work=work, start=start,
                head=head, tail=tail)


def coverage_of(sim: Simulation, n: int) -> float:
    """The share of the step's saved activations (what is live at the end of
    the forward, above the static bytes) that the n blocks added."""
    at = {label: k for k, (label, _) in enumerate(sim.timeline)}
    live = [v for _, v in sim.timeline]
    inside = sum(max(live[at[f"f>{i}"]] - live[at[f"f<{i}"]], 0) for i in range(n))
    end = next((k for k, (label, _) in enumerate(sim.timeline) if label in ("backward", "forward end")), len(live))
    total = live[end - 1] - sim.static_bytes
    return min(inside / total, 1.0) if total > 0 else 1.0


def coverage(model, batch, loss_fn, *, blocks=None) -> float | None:
    """`coverage_of` the plain step: simulated, or measured where it cannot be
    simulated; None if neither runs every block."""
    n = len(find_blocks(model, blocks))
    for real in (False, True):
        try:
            sim = simulate(model, batch, loss_fn, "none", blocks=blocks, marks=True, real=real, seed=0 if real else None)
        except MemfitError:
            raise
        except Exception:  # noqa: BLE001 - see NOTE [real steps]
            continue
        if _all_ran(sim, n):
            return coverage_of(sim, n)
    return None


class CoverageWarning(UserWarning):
    """Much of the model's activations lie outside every block memfit checkpoints."""


COVERAGE_WARNING = 0.5  # below this share of the activations inside the blocks, memfit says so


def coverage_warning(share: float | None) -> str | None:
    if share is None or share >= COVERAGE_WARNING:
        return None
    return (f"only {share:.0%} of the plain step's saved activations lie inside the blocks, so "
            f"checkpointing them saves at most that much; name more blocks with blocks=..., "
            f"e.g. 'encoder.layers|decoder.layers'")


def _all_ran(sim: Simulation, n: int) -> bool:
    labels = {label for label, _ in sim.timeline}
    return all(f"f<{i}" in labels for i in range(n))


def _source(model, batch, loss_fn, n, **kw) -> tuple:
    """How to profile: (real, seed, why, the plain step's simulation). See NOTE [real steps]."""
    try:
        t0 = time.perf_counter()
        fake = simulate(model, batch, loss_fn, "none", **kw)
        fake_s = time.perf_counter() - t0
    except MemfitError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the simulation cannot run, a real step may
        why = f"the simulation cannot run this model's step ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    else:
        if next(model.parameters()).device.type != "cpu" or fake.peak_bytes > available_cpu_bytes() / 2:
            return False, None, None, fake   # a real step would not fit beside the model: trust the simulation
        t0 = time.perf_counter()
        real = simulate(model, batch, loss_fn, "none", real=True, seed=0, **kw)
        real_s = time.perf_counter() - t0
        if real.peak_bytes != fake.peak_bytes or not _all_ran(fake, n):
            why = (f"the simulated step peaks {fake.peak_bytes / real.peak_bytes - 1:+.2%} off the real one "
                   f"(the model takes another path on fake tensors)")
            if _all_ran(real, n):
                return True, 0, why, real
        elif real_s < fake_s and _all_ran(real, n):
            return True, 0, f"a real step of this model takes {real_s:.2f} s, simulating it {fake_s:.2f} s", real
        else:
            return False, None, None, fake
    for seed in range(16):
        sim = simulate(model, batch, loss_fn, "none", real=True, seed=seed, **kw)
        if _all_ran(sim, n):
            return True, seed, why, sim
    raise MemfitError(f"the model skipped some of its {n} blocks in each of 16 training steps tried, so memfit "
                      f"cannot profile them; lower the model's layer-drop probability while planning.")


def _each_point(points: dict, groups: list, simulated) -> dict:
    """{label: the peak model's terms (`_read`)} of each op-level point (NOTE [op-level frontier]), from
    simulated steps (`simulated(units)`). Blocks alike (`groups`, lists of block indices) share their terms,
    so one step runs a different point on each of them: a chain of g alike blocks needs 1/g of the steps. A
    step that fails ends it, with a warning: the plan keeps to the other modes."""
    labels, n = list(points), sum(map(len, groups))
    terms = {label: {k: [0] * n for k in ("kept", "work", "transient")} for label in labels}
    for step in range(max((-(-len(labels) // len(g)) for g in groups), default=0)):
        at = {i: min(step * len(g) + r, len(labels) - 1) for g in groups for r, i in enumerate(g)}
        try:
            got = _read(simulated([Unit(i, i + 1, points[labels[at[i]]][i]) for i in range(n)]), n)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"memfit: recompute on demand left out of the plan, its step failed: {e}")
            return {}
        for g in groups:
            for r, i in enumerate(g):
                if step * len(g) + r < len(labels):
                    for k, per_block in terms[labels[at[i]]].items():
                        for j in g:
                            per_block[j] = got[k][i]
    return terms


def profile(model, batch, loss_fn, *, blocks=None, optimizer=None, cost="flops", distributed=None) -> Profile:
    """Profile each block of `model`'s chain under each mode (keep, recompute,
    the presets, offload on CUDA, and the points of each block's op-level
    frontier for the `cost` kind). Memory and FLOPs are simulated (or
    measured on real steps where the simulation cannot be trusted, see NOTE
    [real steps]); with `cost="time"` the time model of the model's device
    (memfit.timemodel) prices each op.
    `distributed`: profile one rank of a DDP or FSDP2 run (see `simulate`)."""
    blocks = blocks_of(model, batch, loss_fn, blocks)  # NOTE [blocks called several times]
    names = [n for n, _ in find_blocks(model, blocks)]
    n = len(names)
    device = next(model.parameters()).device
    common = dict(blocks=blocks, optimizer=optimizer, distributed=distributed)
    real, seed, why, plain = _source(model, batch, loss_fn, n, marks=True, **common)
    labels = {label for label, _ in plain.timeline}
    fixed = [name for i, name in enumerate(names) if f"b<{i}" not in labels]
    if 0 < len(fixed) < n:  # NOTE [blocks without a backward]
        prof = profile(model, batch, loss_fn, blocks=[x for x in names if x not in fixed], optimizer=optimizer,
                       cost=cost, distributed=distributed)
        prof.fixed = fixed
        return prof
    chains = [len(c) for c in find_chains(model, blocks)]
    model_t = calibrate(device) if cost == "time" else None
    rec = record_ops(model, batch, loss_fn, blocks=blocks, real=real, seed=seed)
    per_block = _frontiers(rec, cost, model_t)
    points = {f"ops/{j + 1}": [modes[min(j, len(modes) - 1)] if modes else RECOMPUTE for modes in per_block]
              for j in range(max(map(len, per_block), default=0))}
    lazy = {f"lazy/{label[4:]}": [strategies.lazy(m) for m in modes] for label, modes in points.items()}
    sims = {KEEP: plain}
    for m in modes_for("cpu" if real else device):
        if m == KEEP:
            continue
        try:
            sims[m] = simulate(model, batch, loss_fn, UNIFORM[m], marks=True, real=real, seed=seed, **common)
        except Exception as e:  # noqa: BLE001 - offload's simulation has not run on every CUDA setup yet
            if m != OFFLOAD:
                raise
            warnings.warn(f"memfit: offload left out of the plan, its simulation failed: {e}")
    segments = max(chains) > 1 and not simulate(model, batch, loss_fn, "segments:1", real=real, seed=seed,
                                                **common).split
    reads = {m: _read(sim, n) for m, sim in sims.items()}
    keys = _alike(rec)
    reads.update(_each_point(lazy, [[i for i in range(n) if keys[i] == k] for k in dict.fromkeys(keys)],
                             lambda units: simulate(model, batch, loss_fn, units, marks=True, real=real, seed=seed,
                                                    **common)))
    reads.update(_estimate(points, reads, rec))
    points.update({label: modes for label, modes in lazy.items() if label in reads})
    keep, baseline = reads[KEEP], sims[KEEP]
    other = [keep["backward_start"][i] - keep["start"] - sum(keep["kept"][:i + 1]) for i in range(n)]
    costs, recomputed = _costs(points, reads, rec, model_t)
    return Profile(
        names=names, device=str(device), modes=tuple(reads), points=points, time_model=model_t,
        baseline_peak_bytes=baseline.peak_bytes, static_bytes=baseline.static_bytes,
        start=keep["start"], head=keep["head"], tail=keep["tail"], other=other,
        kept={m: r["kept"] for m, r in reads.items()}, work={m: r["work"] for m, r in reads.items()},
        transient={m: r["transient"] for m, r in reads.items()}, costs=costs, recomputed=recomputed,
        step_flops=rec.flops, step_time_s=model_t.seconds(rec.flops, rec.moved, rec.count) if model_t else None,
        memory_source=MEASURED if real else SIMULATED, real_steps_because=why, seed=seed, segments=segments,
        chains=chains, coverage=coverage_of(plain, n),
        uniform_peaks={UNIFORM[m]: sim.peak_bytes for m, sim in sims.items() if m not in points})
