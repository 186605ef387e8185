"""What can be done to the blocks of a chain, and the strategy strings that say it.

A strategy resolves to units: runs of consecutive blocks, each with a mode.

* `keep`: run normally, keep every activation.
* `recompute`: keep only the unit's input; recompute everything in backward.
  A unit of several blocks is a segment: it stores the input of its first block
  only, and recomputes all its blocks at once in backward.
* `selective`: inside the block keep the outputs of linear layers (`mm`,
  `addmm`), convolutions and fused attention kernels, and recompute the rest:
  norms, activations, dropout, and an attention core computed with batched
  matmuls (scores, softmax, dropout, scores x values), whose T x T tensors
  are the largest and cheapest to recompute (Korthikanti et al. 2022).
* `pointwise`: keep the outputs of every matrix product (batched ones too),
  convolution and attention kernel, and recompute only the ops that do no
  matrix work: norms, activations, softmax, dropout. It recomputes almost no
  FLOPs and saves the least of the three.
* `scores`: between the two: also recompute the batched matmuls whose output
  is larger than their inputs (the T x T attention scores, q @ k^T), but keep
  the ones whose output is smaller (scores @ v): about half the FLOPs of
  `selective` for a little more memory.
The planner mixes all of them, block by block, with modes of each block's own:
* `ops:addmm@3,addmm@56,...`: save the outputs of exactly these op
  invocations of the block's forward, recompute the rest (NOTE [op-level
  modes]); the planner finds them on the block's op-level frontier.
* `offload` (CUDA): recompute nothing; move the block's saved tensors to
  pinned CPU memory in the forward and back in the backward
  (`torch.autograd.graph.save_on_cpu`). It costs transfer time, not FLOPs, so
  the planner considers it only for a model on CUDA with the time cost.

Strategy strings: `none`, `blocks`, `every:K`, `segments:N`, `sqrt`, `selective`, `scores`, `pointwise`,
`offload`.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy

from memfit.errors import MemfitError

NAMES = ("none", "blocks", "every:K", "segments:N", "sqrt", "selective", "scores", "pointwise", "offload")


class Kind(enum.Enum):
    """What a mode does to a block's activations (see the top of this module)."""

    KEEP = "keep"
    RECOMPUTE = "recompute"
    SELECTIVE = "selective"
    SCORES = "scores"
    POINTWISE = "pointwise"
    OFFLOAD = "offload"
    OPS = "ops"  # saves the op invocations its mode names: NOTE [op-level modes]


@dataclass(frozen=True)
class Mode:
    """What a unit does to its blocks: a kind and, for an op-level mode, the op invocations it saves (`saved`:
    (number, op name) pairs, by number) and whether it recomputes each other tensor when backward needs it
    (`on_demand`, NOTE [recompute on demand] in memfit.core.ondemand). Its printed form is what `Mode.parse`
    reads: `keep`, `recompute`, `selective`, `scores`, `pointwise`, `offload`, `ops:mm@3,addmm@7`,
    `lazy:mm@3,addmm@7`."""

    kind: Kind
    saved: tuple = ()
    on_demand: bool = False

    def __post_init__(self):
        if (self.kind is Kind.OPS) != bool(self.saved) or (self.on_demand and self.kind is not Kind.OPS):
            raise ValueError(f"{self.kind.value} mode with saved ops {self.saved} and on_demand {self.on_demand}")

    @classmethod
    def parse(cls, text) -> Mode:
        """The mode a string names (a Mode is returned as it is); ValueError if it names none."""
        if isinstance(text, Mode):
            return text
        head, colon, body = str(text).partition(":")
        if not colon:
            try:
                kind = Kind(head)
            except ValueError:
                kind = None
            if kind is not None and kind is not Kind.OPS:
                return cls(kind)
        elif head in (OPS, LAZY):
            pairs = [p.rpartition("@") for p in body.split(",")]
            if body and all(name and at and k.isdigit() for name, at, k in pairs):
                return cls.of_ops({int(k): name for name, _, k in pairs}, on_demand=head == LAZY)
        raise ValueError(
            f"{text!r} is not a mode; modes are {', '.join(k.value for k in Kind if k is not Kind.OPS)}"
            f", or an op-level mode like ops:mm@3,addmm@7"
        )

    @classmethod
    def of_ops(cls, saved: dict, on_demand: bool = False) -> Mode:
        """The op-level mode that saves these op invocations ({number: op name})."""
        return cls(Kind.OPS, tuple(sorted(saved.items())), on_demand)

    @property
    def op_level(self) -> bool:
        return self.kind is Kind.OPS

    @property
    def saved_ops(self) -> dict:
        """{number: op name} of the op invocations an op-level mode saves."""
        return dict(self.saved)

    def lazy(self) -> Mode:
        """The twin of an op-level mode that recomputes on demand; any other mode as it is."""
        return Mode(Kind.OPS, self.saved, True) if self.op_level else self

    def __str__(self) -> str:
        if not self.op_level:
            return self.kind.value
        return f"{LAZY if self.on_demand else OPS}:" + ",".join(f"{name}@{k}" for k, name in self.saved)

    def __repr__(self) -> str:
        return f"Mode({str(self)!r})"


OPS, LAZY = "ops", "lazy"  # the heads of an op-level mode's printed form
KEEP, RECOMPUTE, SELECTIVE, SCORES, POINTWISE, OFFLOAD = (Mode(k) for k in list(Kind)[:6])
MODES = (KEEP, RECOMPUTE, SELECTIVE, SCORES, POINTWISE, OFFLOAD)  # the modes that need no ops named
SAC_MODES = (SELECTIVE, SCORES, POINTWISE)  # one block at a time, with a policy over its ops


@dataclass(frozen=True)
class Unit:
    """Blocks `start` to `stop - 1` of the chain, handled as one unit."""

    start: int
    stop: int
    mode: Mode

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode.parse(self.mode))  # a mode's printed form is read here too


def check(strategy: str) -> str:
    """The strategy string, lowercased, once its name and argument are known good."""
    text = str(strategy).strip().lower()
    name, _, arg = text.partition(":")
    accepted = f"accepted: {', '.join(NAMES)} (K, N positive integers)"
    plain = ("none", "blocks", "sqrt", *(str(m) for m in (OFFLOAD, *SAC_MODES)))
    if name in plain and arg:
        raise MemfitError(f"strategy {strategy!r} takes no argument; {accepted}.")
    if name in ("every", "segments"):
        if not (arg.isdigit() and str(int(arg)) == arg and int(arg) >= 1):
            raise MemfitError(f"{name}:{arg} needs a positive integer, like {name}:2; {accepted}.")
    elif name not in plain:
        raise MemfitError(f"unknown strategy {strategy!r}; {accepted}.")
    return text


def units_of(strategy: str, chains) -> list[Unit]:
    """Units for a strategy string over chains of these lengths (`chains`: a
    list of lengths, or one int for a single chain), numbered across the
    chains in order. A strategy applies to each chain alone: `every:K`
    recomputes every K-th block of each chain, `sqrt` and `segments:N` cut
    each chain into segments (never across two chains; a chain shorter than
    N gets one segment per block)."""
    sizes = [chains] if isinstance(chains, int) else list(chains)
    name, _, arg = check(strategy).partition(":")
    k = int(arg) if arg else 0  # every:K and segments:N have one (`check`)
    if name == "segments" and k > max(sizes):
        raise MemfitError(
            f"segments:{k} asks for more segments than the {max(sizes)} blocks of the longest "
            f"chain; use segments:1 to segments:{max(sizes)}."
        )
    return [u for at, n in zip(chain_starts(sizes), sizes) for u in shifted(_chain(name, k, n), at)]


def chain_starts(sizes) -> list[int]:
    """The position of each chain's first block among all the blocks, for chains of these lengths."""
    return [0, *itertools.accumulate(sizes)][: len(sizes)]


def shifted(units, at: int) -> list[Unit]:
    """`units` of one chain, numbered from its first block's position `at` among all the blocks."""
    return [Unit(at + u.start, at + u.stop, u.mode) for u in units]


def _chain(name: str, k: int, n: int) -> list[Unit]:
    if name == "none":
        return [Unit(0, n, KEEP)]
    if name == "blocks":
        return [Unit(i, i + 1, RECOMPUTE) for i in range(n)]
    if name in ("selective", "scores", "pointwise", "offload"):
        return [Unit(i, i + 1, Mode.parse(name)) for i in range(n)]
    if name == "sqrt":
        return segments(n, max(1, round(math.sqrt(n))))
    if name == "every":
        return [Unit(i, i + 1, RECOMPUTE if i % k == 0 else KEEP) for i in range(n)]
    return segments(n, min(k, n))


def segments(n_blocks: int, n: int) -> list[Unit]:
    """`n` recomputed runs of consecutive blocks, as even as possible
    (the first `n_blocks % n` one block longer)."""
    size, extra = divmod(n_blocks, n)
    units, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        units.append(Unit(start, stop, RECOMPUTE))
        start = stop
    return units


aten = torch.ops.aten


# The ops whose outputs `selective` keeps: linear layers (which reach the
# dispatcher as mm / addmm, whatever the input's rank, or as grouped matmuls
# in a mixture of experts), convolutions and fused attention kernels, whose
# outputs are small for their cost. Batched matmuls
# (bmm, baddbmm) are not kept: in a transformer they compute the attention
# scores and their product with the values, whose B x heads x T x T tensors are
# the "5as/h" term of Korthikanti et al. 2022 that selective recomputation removes.
def _ops(*names):
    """The default overloads of the aten ops with these names that this torch has."""
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


SAVED_OPS = _ops(
    "mm",
    "addmm",
    "_addmm_activation",
    "convolution",
    "_convolution",
    # fused expert and quantized matmuls: a mixture of experts' linear layers
    "_grouped_mm",
    "_scaled_grouped_mm",
    "_scaled_mm",
    "_int_mm",
    "_weight_int8pack_mm",
    "_weight_int4pack_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


# What `pointwise` keeps besides: every batched matrix product.
MATRIX_OPS = SAVED_OPS | {aten.bmm.default, aten.baddbmm.default}


def expands(op, args) -> bool:
    """A batched matmul whose output has more elements than each of its inputs."""
    if op not in (aten.bmm.default, aten.baddbmm.default):
        return False
    a, b = args[-2], args[-1]
    out = a.shape[0] * a.shape[1] * b.shape[2]
    return out > a.numel() and out > b.numel()


# What each preset saves: `decide(k, op, args)` for the k-th op of a block's forward.
def _selective(k, op, args) -> bool:
    return op in SAVED_OPS


def _pointwise(k, op, args) -> bool:
    return op in MATRIX_OPS


def _scores(k, op, args) -> bool:
    return op in MATRIX_OPS and not expands(op, args)


PRESETS = {SELECTIVE: _selective, SCORES: _scores, POINTWISE: _pointwise}


# NOTE [op-level modes]
# A mode `ops:mm@3,addmm@7,gelu@12` saves the outputs of the block forward's
# op invocations number 3, 7 and 12 (counting every op the selective-
# checkpoint dispatch mode shows the policy, from 0, in the order the forward
# calls them), provided they are the ops named, and recomputes the rest. The
# planner builds them from a block's own ops (`memfit.planning.frontier`, NOTE
# [op-level frontier]); they apply one block at a time, like the presets. The
# names guard against a run that calls other ops than the profiled one
# (transformers takes another code path on fake tensors): an op that is not
# the one named is recomputed. Such a run can differ in time and memory from
# the plan (the plan's peak is checked where it is simulated or measured),
# never in its gradients: whatever a policy saves, torch's checkpoint is exact.
# `lazy:mm@3,...` saves the same, but recomputes each other tensor when
# backward needs it instead of re-running the block (NOTE [recompute on
# demand] in memfit.core.ondemand); under torch.compile it is its `ops:` twin.
def op_name(op) -> str:
    """`mm` for aten.mm.default, `add.Tensor` for aten.add.Tensor."""
    return str(op).removeprefix("aten.").removesuffix(".default")


# Ops the policy does not number: a tensor constant made inside a forward
# reaches the dispatch modes as `lift_fresh` under fake tensors only, so
# counting it would number the ops of a simulated step and a real one apart.
UNNUMBERED = _ops("lift_fresh", "lift_fresh_copy")


def draws_random(op, args, kwargs) -> bool:
    """The op draws random numbers: it is tagged nondeterministic_seeded and,
    for the attention kernels that carry that tag, has a dropout_p above 0."""
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    names = [a.name for a in op._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    p = kwargs.get("dropout_p", args[i] if i < len(args) else 0.0)
    return bool(p)


# NOTE [random ops]
# torch's recompute restores the RNG state of the region's start once, then
# runs the ops it did not save, skipping the ones it saved. A saved op that
# drew random numbers (dropout inside a fused attention kernel on CUDA, a
# saved dropout) is skipped, so the generator is not advanced past its draw,
# and every random op recomputed after it draws other numbers than in the
# forward: another dropout mask, silently wrong gradients. So once a block
# has saved one random op, every later random op in it is saved too; a random
# op recomputed then always follows only recomputed random ops, and replays
# exactly. Every policy memfit builds goes through this rule (`policy`).


def random_rule(save: bool, random: bool, saved_random: bool) -> tuple:
    """NOTE [random ops]: (whether to save this op, whether its block has saved a random op now), given whether
    the mode would save it, whether it draws random numbers, and whether the block has saved one before."""
    if not random:
        return save, saved_random
    save = save or saved_random
    return save, save


# NOTE [op-level modes under compile]
# torch.compile traces a checkpointed block with the policy and honours what
# it saves, but its trace shows the policy ops that eager mode never
# dispatches (a dropout of p=0 becomes a `clone`), so the op numbers of an
# `ops:` mode drift after the first of them and the names no longer match:
# the block would be recomputed whole. A traced policy therefore aligns: it
# saves the next op of the mode's list at the first op of that name whose
# number, less the drift so far, is at least the listed one, and takes the
# difference as the new drift; an op it has not met within `TRACE_WINDOW` ops
# of its place is given up. It can save another op than the profile meant,
# never a wrong gradient: whatever a policy saves, the checkpoint is exact.
TRACE_WINDOW = 16


def _traced(saved: dict):
    """`decide(k, op, args)` for a block's traced forward: NOTE [op-level modes under compile]."""
    pending, drift = sorted(saved.items()), 0

    def decide(k, op, args):
        nonlocal drift
        while pending and k - drift > pending[0][0] + TRACE_WINDOW:
            pending.pop(0)
        if pending and op_name(op) == pending[0][1] and k - drift >= pending[0][0]:
            drift = k - pending.pop(0)[0]
            return True
        return False

    return decide


def policy(mode: Mode):
    """A function that returns a fresh selective-checkpoint policy for one
    checkpointed call of a block under `mode` (a preset, or `ops:...`), with
    NOTE [random ops] applied; None for modes without one. `fresh(traced=True)`
    gives the policy for torch.compile's trace (NOTE [op-level modes under compile])."""
    if mode.op_level:
        saved = mode.saved_ops
        exact = lambda k, op, args: saved.get(k) == op_name(op)  # noqa: E731
        make = lambda traced: _traced(saved) if traced else exact  # noqa: E731
    elif mode in PRESETS:
        make = lambda traced: PRESETS[mode]  # noqa: E731
    else:
        return None

    def fresh(traced=False):
        decide, decisions, saved_random = make(traced), [], False

        def policy_fn(ctx, op, *args, **kwargs):
            nonlocal saved_random
            if op in UNNUMBERED:
                return CheckpointPolicy.PREFER_RECOMPUTE
            if ctx.is_recompute:  # older torch asks again while recomputing: answer as in the forward
                save = decisions[policy_fn.replayed % len(decisions)]
                policy_fn.replayed += 1
            else:
                save, saved_random = random_rule(
                    decide(len(decisions), op, args), draws_random(op, args, kwargs), saved_random
                )
                decisions.append(save)
            return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

        policy_fn.replayed, policy_fn.decisions = 0, decisions
        return policy_fn

    fresh.on_demand = mode.on_demand  # type: ignore[attr-defined]  # eager: NOTE [recompute on demand] in memfit.core.ondemand
    return fresh
