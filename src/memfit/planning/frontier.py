"""Each block's ops, recorded in the plain step, and the op-level choices they give: which outputs to save,
what recomputing the rest costs, and each block's Pareto frontier of the two.

Costs come from each block's ops, recorded in the plain step (`record_ops`):
in FLOPs, the matmul FLOPs plus one per element of the other ops that a mode
recomputes; in time, what the device's time model (memfit.planning.timemodel) says
those ops take, plus a policy's cost on each op for the selective modes. No
step is run on the model itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.core import pruning, strategies
from memfit.core.blocks import find_blocks
from memfit.core.flops import op_flops
from memfit.core.strategies import KEEP, RECOMPUTE, Mode
from memfit.core.wrapping import wrap
from memfit.planning.simulation import copy_with, device_of, each_call, faking, on_cpu, real_paths, real_step

__all__ = ["Op", "record_ops", "saved_by", "recomputed_ops", "block_cost", "frontier", "frontiers", "alike"]


@dataclass
class Op:
    """One op of a block's forward, as the selective-checkpoint dispatch mode
    sees it (NOTE [op-level modes] in memfit.core.strategies)."""

    name: str
    flops: int  # matmul, convolution and attention FLOPs (the FLOP counter's)
    elements: int  # elements it produces, if it does no matrix work and is no view: the FLOP cost's 1 each
    moved: int  # bytes it reads and writes (0 for a view)
    new_bytes: int  # bytes of the storages it creates
    random: bool  # it draws random numbers (NOTE [random ops])
    presets: frozenset  # the preset modes that save its output
    saveable: bool = True  # its output can be saved: a new storage that no later op of the block writes in place


class _OpRecorder(TorchDispatchMode):
    """Every op of a training step: the step's totals (FLOPs, bytes moved,
    ops: what the time model needs), and inside each block's forward each op
    the selective-checkpoint mode would see, as an `Op`, with the block's
    dataflow (`flows[i]`, NOTE [pruned recompute] in memfit.core.pruning: what each
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
        flow = self.flows[self.block].take(func, args, kwargs, out) if self.block is not None else None
        if not pruning.numbered(func):
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
        for k in flow.wrote:  # an output written in place later cannot be saved
            ops[k].saveable = False
        inputs = {id(t.untyped_storage()) for t in ins}
        new = {} if view else {id(s): s for t in outs if id(s := t.untyped_storage()) not in inputs}
        elements = 0 if view or func in strategies.MATRIX_OPS else sum(t.numel() for t in outs)
        presets = frozenset(m for m, decide in strategies.PRESETS.items() if decide(len(ops), func, args))
        ops.append(
            Op(
                strategies.op_name(func),
                flops,
                elements,
                moved,
                sum(st.nbytes() for st in new.values()),
                strategies.draws_random(func, args, kwargs),
                presets,
                saveable=bool(new),
            )
        )
        return out


def record_ops(model, batch, loss_fn, *, blocks=None, real=False, seed=None) -> _OpRecorder:
    """The ops of a plain training step (`_OpRecorder`), on fake tensors, so
    deterministic and cheap, or on a real step (see NOTE [real steps] in memfit.planning.profiling)."""
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    mode = real_step(seed) if fake is None else fake
    fmodel, fbatch = copy_with(model, batch, on_cpu if fake is None else faking(fake, device_of(model)))
    wrap(fmodel, "none", blocks=blocks)  # as every step memfit runs: no KV cache (NOTE [no KV cache])
    fmodel.train()
    chain = [m for _, m in find_blocks(fmodel, blocks)]
    rec = _OpRecorder(len(chain))

    def enter(i):
        rec.block, rec.flows[i] = i, pruning.Dataflow()

    def leave(i, out):
        rec.block = None

    handles = each_call(chain, enter, leave)
    with mode, real_paths(fbatch), rec, torch.autograd.graph.saved_tensors_hooks(rec.saved, lambda t: t):
        loss = loss_fn(fmodel, fbatch)
        for h in handles:
            h.remove()
        loss.backward()
    return rec


def saved_by(mode: Mode, ops: list) -> set:
    """The indices of the ops whose outputs `mode` saves, NOTE [random ops] applied."""
    if mode == KEEP:
        return set(range(len(ops)))
    if mode.on_demand:  # recomputed on demand, which holds every random op's output
        named = mode.saved_ops
        return {k for k, op in enumerate(ops) if op.random or named.get(k) == op.name}
    if mode.op_level:
        saved = {k for k, name in mode.saved if k < len(ops) and ops[k].name == name}
    else:
        saved = {k for k, op in enumerate(ops) if mode in op.presets}
    drawn = False
    for k, op in enumerate(ops):  # the rule the policy applies as the forward runs
        save, drawn = strategies.random_rule(k in saved, op.random, drawn)
        if save:
            saved.add(k)
    return saved


def op_cost(op: Op, kind: str, model) -> float:
    return op.flops + op.elements if kind == "flops" else model.seconds(op.flops, op.moved)


def recomputed_ops(mode, ops, flow) -> list:
    """The ops a recompute under `mode` runs again: those it does not save, up to the last one whose output
    backward needs (torch's early stop), but for a selective mode only those that backward needs (NOTE
    [pruned recompute] in memfit.core.pruning)."""
    saved = saved_by(mode, ops)
    skip = set()
    if mode not in (KEEP, RECOMPUTE) and not flow.opaque:
        skip = pruning.skipped(flow.ops, flow.roots, flow.last, saved)
    return [op for k, op in enumerate(ops[: flow.last + 1]) if k not in saved and k not in skip]


def block_cost(mode, ops, flow, kind, model) -> float:
    """What recomputing a block's ops under `mode` costs; in time, a policy's cost on each op too (NOTE [time
    model])."""
    policy = model.per_policy_op * len(ops) if kind == "time" and mode not in (KEEP, RECOMPUTE) else 0.0
    return policy + sum(op_cost(op, kind, model) for op in recomputed_ops(mode, ops, flow))


# NOTE [op-level frontier]
# Between keeping a block's activations and recomputing them all lie the
# choices of which of its ops' outputs to save. Were every op it has not
# saved re-run (up to the last one backward needs), each op would be an item:
# saving it costs the bytes of the storage it creates and saves its recompute
# cost (its FLOPs plus one per element, or its time). The exact Pareto
# frontier of (bytes saved, cost avoided) over a block's items is a knapsack,
# computed here by merging and pruning lists of points. The recompute skips
# the ops nothing needs (NOTE [pruned recompute] in memfit.core.pruning), so
# saving an op can also spare the ops before it: each point is priced by the
# pruned recompute, outputs saved that nothing reads are dropped from it, and
# a greedy walk that saves, step by step, the op sparing the most cost per
# byte adds the points the knapsack cannot see. Of them all, the points that leave
# `FRONTIER` shares of the block's whole recompute cost (falling by 0.7 from
# 0.6: the planner trades memory against small costs) become modes `ops:...`
# for that block, and their twins `lazy:...` (NOTE [recompute on demand] in
# memfit.core.ondemand); each block of the chain gets its own. The `ops:` points
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
# memfit.planning.planner): the peak it predicts never rests on the estimate.
# Ops that cannot be saved: views and in-place ops (no storage of their own),
# outputs written in place later (torch's cache refuses them), random ops
# (NOTE [random ops]: saving them would force saving later ones).
FRONTIER = tuple(0.6 * 0.7**k for k in range(15))  # 0.6 down to 0.004


def frontier(ops: list, flow, kind: str, model=None, shares=FRONTIER) -> list[Mode]:
    """The distinct `ops:...` modes of a block that leave these shares of its recompute cost, fewest bytes
    first; `flow` is the block's `memfit.core.pruning.Dataflow`."""
    last, price = flow.last, [op_cost(op, kind, model) for op in ops]
    items = [
        (k, op.new_bytes, price[k])
        for k, op in enumerate(ops[: last + 1])
        if op.saveable and not op.random and op.new_bytes > 0 and price[k] > 0
    ]
    names = {k: op.name for k, op in enumerate(ops)}
    # (bytes, cost avoided, ops saved), bytes ascending, cost strictly rising
    pareto: list[tuple[int, float, frozenset]] = [(0, 0.0, frozenset())]
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
    points: list[tuple[int, float, frozenset]] = []  # (bytes, cost left, ops saved): bytes ascending, cost falling
    for b, c, ps in sorted((sum(ops[k].new_bytes for k in ps), c, ps) for ps, c in found):
        if not points or c < points[-1][1]:
            points.append((b, c, ps))
    modes, whole = [], sum(price[: last + 1])
    for share in shares:  # the fewest bytes that leave at most this share of the block's recompute cost
        best = next((p for p in points if p[1] <= share * whole), points[-1])
        mode = Mode.of_ops({k: names[k] for k in best[2]}) if best[2] else None
        if mode is not None and mode not in modes:
            modes.append(mode)
    return modes


def _pruned(saved, flow, price) -> tuple:
    """(the ops of `saved` the recompute uses, what it costs) for a block whose
    recompute takes `saved` from the cache and skips what nothing needs (NOTE
    [pruned recompute]): a saved output that nothing reads is not worth its bytes."""
    last = flow.last
    if flow.opaque:
        return frozenset(saved), sum(c for k, c in enumerate(price[: last + 1]) if k not in saved)
    need = pruning.needed(flow.ops, flow.roots, last, saved)
    used = frozenset(k for k in saved if k in need or flow.ops[k].kind not in (pruning.FRESH, pruning.INPLACE))
    skip = pruning.skipped(flow.ops, flow.roots, last, used)
    return used, sum(c for k, c in enumerate(price[: last + 1]) if k not in used and k not in skip)


def _greedy(items, flow, price) -> set:
    """Points the knapsack, whose items are independent, cannot see: saving an
    op can spare the ops before it that only it needed. From nothing saved,
    save at each step the op that spares the most cost per byte."""
    saved, cost = _pruned(frozenset(), flow, price)
    points: set[tuple[frozenset, float]] = set()
    while True:
        steps = [
            (c, -b, k, s)
            for k, b, _ in items
            if k not in saved
            for s, c in [_pruned(saved | {k}, flow, price)]
            if c < cost
        ]
        if not steps:
            return points
        _, _, _, saved = min(steps, key=lambda t: ((t[0] - cost) / -t[1], t[2]))
        cost = _pruned(saved, flow, price)[1]
        points.add((saved, cost))


def alike(rec) -> list:
    """Each block's key: blocks with the same key ran the same ops on the same dataflow (a transformer's layers)."""
    return [
        (
            tuple((dataclasses.astuple(op), f) for op, f in zip(rec.blocks[i], flow.ops)),
            frozenset(flow.roots),
            flow.last,
            flow.opaque,
        )
        for i, flow in enumerate(rec.flows)
    ]


def frontiers(rec, kind, model) -> list:
    """Each block's `frontier`, worked out once for blocks alike."""
    known: dict = {}
    return [
        known[k] if k in known else known.setdefault(k, frontier(rec.blocks[i], rec.flows[i], kind, model))
        for i, k in enumerate(alike(rec))
    ]
