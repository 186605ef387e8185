"""The fastest checkpointing plan that fits a memory budget.

    plan = memfit.plan(model, batch, loss_fn, budget="60%")
    print(plan)                     # one line a block: what, how many bytes, what it costs
    memfit.apply(model, plan)

The planner chooses, for each block of the chain, `keep`, `pointwise`,
`scores`, `selective` or `recompute`, and groups consecutive recomputed blocks into segments where that
saves memory, to minimise the recomputation cost under the budget.

NOTE [exact, then checked]
It solves the choice exactly by dynamic programming over the blocks and the
bytes kept through the forward, discretised into 1000 bins rounded up (as in
Beaumont et al. 2019, "Optimal checkpointing for heterogeneous chains"), with
the peak model of `memfit.planning.profiling.Profile`. That model is additive and
therefore approximate where blocks interact; so the chosen plan's peak is then
simulated exactly (fake tensors, see `memfit.planning.simulation`). If the simulation
exceeds the budget, the planner solves again with the budget lowered by the
excess, until the simulated peak fits. The predicted peak it reports is the
simulated one: on CPU it is what the step will measure, to the byte.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from memfit.core import schedule, strategies
from memfit.core.blocks import find_blocks
from memfit.core.memory import fmt_bytes
from memfit.core.schedule import BlockChoice, Budget, Plan
from memfit.core.strategies import KEEP, OFFLOAD, RECOMPUTE, Mode, Unit
from memfit.core.wrapping import applied_strategy, wrap
from memfit.errors import MemfitError
from memfit.planning.profiling import CoverageWarning, Profile, coverage_warning, profile
from memfit.planning.sharding import Layout
from memfit.planning.simulation import MEASURED, blocks_of, device_of, simulate

__all__ = ["plan", "solve", "resolve_plan", "apply"]

BINS = 1000
UNIFORM_FALLBACKS = ("pointwise", "scores", "selective", "every:3", "every:2", "blocks", "sqrt")


@dataclass(frozen=True)
class _Candidate:
    start: int
    stop: int
    mode: Mode
    kept: float
    need: float  # bytes above `start` + kept-before that the unit's peak needs
    cost: float


def _candidates(prof: Profile, kind: str) -> list[_Candidate]:
    """Every unit the plan may use: each block alone in each mode, and every
    segment of two or more consecutive recomputed blocks."""
    n, kept, work, tr, other = len(prof.names), prof.kept, prof.work, prof.transient, prof.other
    starts = strategies.chain_starts(prof.chain_sizes)
    out = []
    for b in range(1, n + 1):
        i = b - 1
        first = max(s for s in starts if s <= i)  # a segment stays inside its chain
        for mode in prof.modes:
            if mode == OFFLOAD and kind == "flops":  # costs time, not FLOPs
                continue
            need = max(other[i] + kept[mode][i] + work[mode][i], tr[mode][i])
            out.append(_Candidate(i, b, prof.mode(mode, i), kept[mode][i], need, prof.costs[kind][mode][i]))
        # Segments [a, b): the recompute materialises the blocks' activations as in `keep`, then
        # backward walks down them: at block k, blocks a..k are live and k's backward rises on top.
        running, cost, transient = None, prof.cost(RECOMPUTE, i, kind), tr[RECOMPUTE][i]
        for a in range(b - 1, first - 1 if prof.segments else b - 2, -1):
            at_a = kept[KEEP][a] + work[KEEP][a] + other[a]
            running = at_a if running is None else max(running + kept[KEEP][a], at_a)
            if a == b - 1:
                continue
            cost += prof.cost(RECOMPUTE, a, kind)
            transient = max(transient, tr[RECOMPUTE][a])
            need = max(kept[RECOMPUTE][i] + running, transient)
            out.append(_Candidate(a, b, RECOMPUTE, kept[RECOMPUTE][i], need, cost))
    return out


def solve(prof: Profile, budget: float, kind: str = "time", bins: int = BINS):
    """The cheapest units whose modelled peak fits `budget`, with their cost,
    or None if none fits. Exact for the model, up to the rounding of kept
    bytes up to `bins` bins."""
    n = len(prof.names)
    avail = budget - prof.start
    if prof.tail > budget or avail <= 0:
        return None
    step = avail / bins
    inf = float("inf")
    best = [torch.full((bins + 1,), inf, dtype=torch.float64) for _ in range(n + 1)]
    came = [torch.full((bins + 1,), -1, dtype=torch.long) for _ in range(n + 1)]
    best[0][0] = 0.0
    cands = _candidates(prof, kind)
    for idx, c in enumerate(cands):
        limit = math.floor((avail - c.need) / step)  # the most kept-before bins this unit tolerates
        kb = math.ceil(c.kept / step) if c.kept > 0 else 0
        if limit < 0 or kb > bins:
            continue
        limit = min(limit, bins - kb)
        src = best[c.start][: limit + 1] + c.cost
        dst = best[c.stop][kb : kb + limit + 1]
        better = src < dst
        dst[better] = src[better]
        came[c.stop][kb : kb + limit + 1][better] = idx
    last = math.floor((avail - prof.head) / step)
    if last < 0:
        return None
    final = best[n][: min(last, bins) + 1]
    k = int(torch.argmin(final))
    if final[k] == inf:
        return None
    units, j = [], n
    while j > 0:
        c = cands[int(came[j][k])]
        units.append(Unit(c.start, c.stop, c.mode))
        k -= math.ceil(c.kept / step) if c.kept > 0 else 0
        j = c.start
    return units[::-1], float(final.min())


def _sources(prof: Profile, cost: str) -> dict:
    """Where the plan's numbers come from: memory and FLOPs simulated on fake
    tensors or measured on real steps (and why), cost timed or counted."""
    memory = prof.memory_source + (f": {prof.real_steps_because}" if prof.real_steps_because else "")
    return {
        "memory": memory,
        "flops": "counted on real steps on a CPU copy" if prof.memory_source == MEASURED else "counted on fake tensors",
        "cost": _time_source(prof) if cost == "time" else "FLOPs counted",
        "segments": "offered" if prof.segments else "not offered: this chain's blocks cannot form segments",
    }


def _time_source(prof: Profile) -> str:
    m = prof.time_model
    if m is None:
        return "no time model (cost flops)"
    return (
        f"time model of {m.device} (NOTE [time model]): {m.per_flop * 1e12:.2g} ps/FLOP, "
        f"{m.per_byte * 1e12:.2g} ps/byte, {m.per_op * 1e6:.2g} us/op, {m.per_policy_op * 1e6:.2g} us/op more "
        f"under a policy; timings spread {m.spread:.0%}, fit within {m.error:.0%}"
    )


def _choices(prof: Profile, units, kind) -> list[BlockChoice]:
    step = prof.step_cost(kind)
    out = []
    for u in units:
        segment = [prof.names[u.start], prof.names[u.stop - 1]] if u.stop - u.start > 1 else None
        for i in range(u.start, u.stop):
            kept = prof.kept[prof.column(u.mode, i)][i] if (segment is None or i == u.stop - 1) else 0
            out.append(BlockChoice(prof.names[i], u.mode, segment, int(kept), prof.cost(u.mode, i, kind) / step))
    return out


def _minimum_budget(prof: Profile, kind: str) -> float:
    """The smallest budget the peak model finds a plan for (bisection)."""
    lo, hi = float(max(prof.tail, prof.start)), float(prof.baseline_peak_bytes * 2)
    if solve(prof, hi, kind, bins=200) is None:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if solve(prof, mid, kind, bins=200) is not None else (mid, hi)
    return hi


def _fit(prof: Profile, budget: int, kind: str, peak_of):
    """Solve, simulate, and correct: (units, cost, simulated peak) of the
    cheapest plan found whose simulated peak fits `budget`, or None.

    If a plan's simulated peak exceeds the budget, solve again with the target
    lowered by the excess. Once a plan fits, try once more with the unused
    slack added back (the model rounds kept bytes up), and keep the cheaper
    plan that fits."""
    target, best, raised = budget, None, False
    for _ in range(8):
        solution = solve(prof, target, kind)
        if solution is None:
            return best
        units, total = solution
        peak = peak_of(units)
        if peak <= budget:
            if best is None or total < best[1]:
                best = (units, total, peak)
            if raised or peak == budget:
                return best
            target, raised = target + (budget - peak), True
        elif best is not None:
            return best
        else:
            target -= peak - budget + 1
    return best


def _search(prof: Profile, budget_bytes: int, cost: str, peak_of):
    """(units, cost, simulated peak) of the cheapest plan found that fits, or None."""
    if prof.baseline_peak_bytes <= budget_bytes:  # the plain run fits: recompute nothing
        return [Unit(i, i + 1, KEEP) for i in range(len(prof.names))], 0.0, prof.baseline_peak_bytes
    found = _fit(prof, budget_bytes, cost, peak_of)
    # NOTE [never worse than uniform]: the peak model rounds bytes up, so at a budget a uniform strategy
    # just meets, the DP can miss it. Each uniform strategy cheaper than the plan found is simulated,
    # and the cheapest that fits wins: no uniform strategy that fits the budget costs less than the plan.
    for name in UNIFORM_FALLBACKS:
        units = strategies.units_of(name, prof.chain_sizes)
        if not prof.segments and any(u.stop - u.start > 1 and u.mode != KEEP for u in units):
            continue
        total = sum(prof.cost(u.mode, i, cost) for u in units for i in range(u.start, u.stop))
        if (found is None or total < found[1]) and (peak := peak_of(units)) <= budget_bytes:
            found = (units, total, peak)
    return found


def signature(model, batch, blocks=None) -> dict:
    """What a plan depends on: the chain, the parameters' and inputs' shapes."""
    return {
        "model": type(model).__name__,
        "blocks": [n for n, _ in find_blocks(model, blocks)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "inputs": [[list(t.shape), str(t.dtype)] for t in tree_leaves(batch) if isinstance(t, torch.Tensor)],
    }


# NOTE [plan cache]
# `apply(model, budget=...)` may be called every step (a trainer's hook), so
# plans are cached, per model object (weakly: a model that goes away takes
# its plans with it), under everything else a plan depends on: the arguments,
# the inputs' shapes and dtypes, each parameter's and buffer's shape, dtype,
# device and requires_grad, the module tree as `repr` prints it (a dropout's
# p, a layer swapped), a Hugging Face config (the attention implementation),
# and the loss function object itself. A copy of the model, or the same model
# cast to bf16 or moved, is planned again.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def _cache_key(model, batch, *arguments) -> str:
    tensors = [
        [n, list(t.shape), str(t.dtype), str(t.device), t.requires_grad]
        for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
    ]
    inputs = [[list(t.shape), str(t.dtype), str(t.device)] for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    return json.dumps([tensors, inputs, repr(model), repr(getattr(model, "config", None)), *map(str, arguments)])


class _NoPlan(Exception):
    """No plan fits the budget: the profile and the budget in bytes, which `plan`'s error quotes."""

    def __init__(self, prof: Profile, budget_bytes: int):
        super().__init__()
        self.prof, self.budget_bytes = prof, budget_bytes


def plan(
    model,
    batch,
    loss_fn,
    budget,
    *,
    blocks=None,
    cost="time",
    optimizer=None,
    distributed=None,
    world_size: int | None = None,
    tp: int = 1,
    parallelize=None,
    compile=None,
) -> Plan:
    """The cheapest plan whose predicted peak fits `budget`: what to do to each block of `model`'s chains.

    Args:
        model: the model to train, as it will be trained (dtype, device, train mode).
        batch: one batch of its training data, as `loss_fn` takes it.
        loss_fn: `loss_fn(model, batch)` returns the loss of a training step.
        budget: bytes, '20GiB', '800MB', '60%' (of the plain run's peak, with the same batch and optimizer),
            or 'auto' (free device memory less 10%).
        blocks: the blocks to checkpoint (names, a container's name, or None: found, `memfit.find_chains`).
        cost: 'time' (the device's time model, memfit.planning.timemodel; the default) or 'flops' (deterministic).
        optimizer: the optimizer class whose state counts (default AdamW).
        distributed: 'ddp' or 'fsdp' (FSDP2) with `world_size`, or a `memfit.planning.sharding.Layout` (mixed
            precision, resharding): plans for one rank of that run, simulated with FSDP2 itself on torch's fake
            process group at any world size (NOTE [one rank simulated]), `batch` being the rank's share;
            budgets and peaks are then per rank. The model may be on the meta device (too big for this machine).
        world_size: the ranks of the run, data-parallel × tensor-parallel.
        tp: tensor-parallel degree, with `parallelize(model, tp_mesh)` applying it (as torchtitan's
            `parallelize_module` plans do) before memfit checkpoints and FSDP2 shards the model.
        parallelize: see `tp`.
        compile: a torch.compile backend the model will be trained under: the plan is made for the compiled
            step, whose peak is measured (NOTE [planning for the compiled step]); '60%' is then of the compiled
            plain step.

    Plans are cached per model object and everything else they depend on (NOTE [plan cache]), so calling
    this every step plans once. Raises MemfitError, saying the smallest peak reachable, if no plan fits.
    """
    distributed = Layout.of(
        distributed, **({"world_size": world_size} if world_size else {}), tp=tp, parallelize=parallelize
    )
    try:
        return _planned(
            model,
            batch,
            loss_fn,
            budget,
            blocks=blocks,
            cost=cost,
            optimizer=optimizer,
            distributed=distributed,
            compile=compile,
        )
    except _NoPlan as none:
        prof, budget_bytes = none.prof, none.budget_bytes
    if compile:
        raise MemfitError(
            f"no plan tried peaks at or below {fmt_bytes(budget_bytes)} once compiled with "
            f"{compile} (NOTE [planning for the compiled step]); give a larger budget, or plan for "
            f"eager mode (no compile)."
        )
    minimum = _minimum_budget(prof, cost)
    solution = solve(prof, minimum, cost, bins=200)
    reachable = minimum
    if solution:
        reachable = simulate(
            model,
            batch,
            loss_fn,
            solution[0],
            blocks=prof.names,
            optimizer=optimizer,
            distributed=distributed,
            real=prof.memory_source == MEASURED,
            seed=prof.seed,
        ).peak_bytes
    raise MemfitError(
        f"budget {fmt_bytes(budget_bytes)} is below the smallest peak checkpointing reaches for this "
        f"model and batch, about {fmt_bytes(max(reachable, minimum))} (plain run: "
        f"{fmt_bytes(prof.baseline_peak_bytes)}); give a budget of at least that, or a smaller batch."
    )


def plan_or_none(model, batch, loss_fn, budget, **options) -> Plan | None:
    """`plan`, or None where no plan fits the budget."""
    try:
        return _planned(model, batch, loss_fn, budget, **options)
    except _NoPlan:
        return None


def _check(cost, compile, distributed) -> None:
    """The options `plan` cannot take, in one sentence each, before any work."""
    if cost not in ("time", "flops"):
        raise MemfitError(f"unknown cost {cost!r}; use time (the device's time model) or flops (deterministic).")
    if compile:
        from memfit.core.measurement import check_backend

        check_backend(compile)
        if distributed:
            raise MemfitError("planning for a compiled step is for one process; give compile or distributed, not both.")


def _peaks(prof: Profile, model, batch, loss_fn, optimizer, distributed):
    """`peak_of(units)`: the simulated peak of the step with `units` applied, each simulated once (the uniform
    strategies' peaks come from the profile)."""
    peaks = {
        tuple(strategies.units_of(name, prof.chain_sizes)): peak for name, peak in (prof.uniform_peaks or {}).items()
    }

    def peak_of(units):
        key = tuple(units)
        if key not in peaks:
            peaks[key] = simulate(
                model,
                batch,
                loss_fn,
                units,
                blocks=prof.names,
                optimizer=optimizer,
                distributed=distributed,
                real=prof.memory_source == MEASURED,
                seed=prof.seed,
            ).peak_bytes
        return peaks[key]

    return peak_of


def _planned(
    model,
    batch,
    loss_fn,
    budget,
    *,
    blocks=None,
    cost="time",
    optimizer=None,
    distributed=None,
    compile=None,
    checked=False,
) -> Plan:
    """`plan`; raises _NoPlan where no plan fits. `checked`: see `profile`."""
    _check(cost, compile, distributed)
    budget = Budget.parse(budget)  # a bad budget fails before profiling
    distributed = Layout.of(distributed)
    key = _cache_key(model, batch, budget.text, cost, blocks, optimizer, repr(distributed), compile)
    cached = _CACHE.get(model, {}).get(key)
    if cached is not None and cached[0] is loss_fn:  # NOTE [plan cache]
        return cached[1]
    blocks = blocks_of(model, batch, loss_fn, blocks)  # NOTE [blocks called several times] in memfit.core.blocks
    sig, device = signature(model, batch, blocks), device_of(model)
    prof = profile(
        model, batch, loss_fn, blocks=blocks, optimizer=optimizer, cost=cost, distributed=distributed, checked=checked
    )
    peak_of = _peaks(prof, model, batch, loss_fn, optimizer, distributed)

    sources, baseline = _sources(prof, cost), prof.baseline_peak_bytes
    if compile:
        from memfit.core.measurement import compiled_step

        measured = functools.partial(
            compiled_step, model, batch, loss_fn, backend=compile, blocks=prof.names, optimizer=optimizer
        )
        found, baseline, budget_bytes = _for_compiled(prof, budget, device, cost, peak_of, measured)
        sources.update(_compiled_sources(compile, sources))
    else:
        budget_bytes = budget.bytes(prof.baseline_peak_bytes, device)
        found = _search(prof, budget_bytes, cost, peak_of)
    if found is None:
        raise _NoPlan(prof, budget_bytes)
    if (warning := coverage_warning(prof.coverage)) is not None:
        warnings.warn(f"memfit: {warning}.", CoverageWarning, stacklevel=3)
    result = _plan_from(prof, found, sig, budget_bytes, baseline, cost, sources)
    _CACHE.setdefault(model, {})[key] = (loss_fn, result)
    return result


def _plan_from(prof: Profile, found, sig, budget_bytes, baseline, cost, sources) -> Plan:
    """`found`: (units, cost, peak[, recomputed FLOPs as a share of a step, if measured])."""
    units, total, peak, *measured = found
    recomputed = sum(prof.recomputed_flops(u.mode, i) for u in units for i in range(u.start, u.stop))
    if measured:  # counted on a compiled step: it is also the cost, in FLOPs
        recomputed = measured[0] * prof.step_flops
        total = recomputed if cost == "flops" else total
    chosen = {c.name: c for c in _choices(prof, units, cost)}  # and the blocks left plain, in model order
    blocks = [chosen.get(name) or BlockChoice(name, KEEP, None, 0, 0.0) for name in sig["blocks"]]
    return Plan(
        blocks,
        budget_bytes,
        peak,
        baseline,
        total / prof.step_cost(cost),
        cost,
        recomputed / prof.step_flops,
        sig,
        sources,
        prof.coverage,
        prof.step_time_s,
    )


# NOTE [planning for the compiled step]
# torch.compile changes what a step keeps: decompositions, the partitioner
# (which honours memfit's selective policies and recomputes what it chooses
# in regions without one), the order of the backward's ops. On the tiny GPT
# (CPU, 2026-12-02) the eager plan for 50% of the peak peaks at 61% compiled,
# above its budget, and its plan for 80% at 51%, recomputing more than it
# needs. The peak of a compiled step cannot be simulated block
# by block, so the planner steers the eager planner by measurement: it plans
# in eager mode for a target, compiles the plan on a copy of the model and
# measures a step's peak and FLOPs. If the eager plan for the budget fits
# once compiled, the target is bisected upwards, towards the eager plain peak
# (a higher target recomputes less); if not, downwards, towards the lowest
# target the planner reaches (if even that plan does not fit, there is no
# plan). It keeps the plan whose compiled peak fits that recomputes the
# fewest FLOPs on its compiled step (with the time cost: the least eager
# time), after at most `COMPILED_TRIES` bisection steps (a plan met before is
# not compiled again). The plan's peak and FLOPs are its compiled step's.
COMPILED_TRIES = 6


def _compiled_sources(compile, sources) -> dict:
    return {
        "memory": f"measured on compiled steps ({compile}), one for each plan tried (NOTE [planning for the "
        f"compiled step]); the blocks' terms from eager steps, {sources['memory']}",
        "flops": f"counted on the compiled steps ({compile})",
    }


def _for_compiled(prof, budget, device, cost, peak_of, measured):
    """(units, cost, compiled peak, compiled recomputed FLOPs) of the cheapest plan tried whose compiled peak fits
    (or None), the compiled plain step's peak, and the budget in bytes."""
    keep = [Unit(i, i + 1, KEEP) for i in range(len(prof.names))]
    plain, plain_flops = measured(keep)
    budget_bytes = budget.bytes(plain, device)
    if plain <= budget_bytes:
        return (keep, 0.0, plain, 0.0), plain, budget_bytes
    steps, best = {}, None

    def fits(target) -> bool:
        """Whether the eager plan for `target` fits once compiled; the cheapest that fits is kept."""
        nonlocal best
        found = _search(prof, target, cost, peak_of)
        if found is None:
            return False
        units, total, _ = found
        if tuple(units) not in steps:
            steps[tuple(units)] = measured(units)
        peak, flops = steps[tuple(units)]
        recomputed = flops / plain_flops - 1
        key = recomputed if cost == "flops" else total
        if peak <= budget_bytes and (best is None or key < best[0]):
            best = (key, (units, total, peak, recomputed))
        return peak <= budget_bytes

    if fits(budget_bytes):
        lo, hi = budget_bytes, prof.baseline_peak_bytes  # a higher target may fit too, and recompute less
    else:
        lo, hi = _minimum_budget(prof, cost), budget_bytes
        if not fits(lo):
            return None, plain, budget_bytes
    for _ in range(COMPILED_TRIES):  # bisect: `lo` fits once compiled, `hi` does not
        if hi - lo < 0.01 * budget_bytes:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return best[1], plain, budget_bytes


def resolve_plan(strategy, model, batch, loss_fn, blocks=None, cost="time", compile=None):
    """The `Plan` a schedule names (planned now for `batch` when it is a
    budget, loaded when it is a file), or None when it names no plan."""
    s = schedule.parse(strategy)
    if s.budget is None:
        return s.strategy if isinstance(s.strategy, Plan) else None
    if batch is None or loss_fn is None:
        raise MemfitError(
            f"checkpointing {str(s)!r} plans for a batch: give batch and loss_fn too, or a plan file (plan:PATH.json)."
        )
    return plan(model, batch, loss_fn, s.budget, blocks=blocks, cost=cost, compile=compile)


def apply(
    model: torch.nn.Module,
    strategy: object = "blocks",
    blocks: object = None,
    state_replay: bool = True,
    *,
    budget: object = None,
    batch: object = None,
    loss_fn: Callable | None = None,
    cost: str = "time",
    training_only: bool = True,
) -> torch.nn.Module:
    """Checkpoint the blocks of `model` in place, by a strategy or a plan (`memfit.core.wrapping.wrap` does the
    wrapping); applied again, it replaces what was applied.

    Args:
        model: the model whose chains of blocks to checkpoint (`memfit.find_chains`).
        strategy: any spelling `memfit.core.schedule.parse` reads: a strategy (`blocks`, `selective`, `every:2`,
            `sqrt`, ...), `true`/`false`, a `Plan`, `plan:FILE.json`, `plan:60%`, `{chain: strategy}`, or
            units (`memfit.core.strategies.Unit`).
        blocks: the blocks to checkpoint, if not the chains found (names, or a container's name).
        state_replay: replay module state written in the forward (BatchNorm statistics) in the recompute.
        budget: plan for this budget ('60%', '8GiB', 'auto') instead of `strategy`; needs `batch` and `loss_fn`.
        batch: a training batch, to plan with (and to find blocks called several times per step).
        loss_fn: `loss_fn(model, batch)` returns the loss, to plan with.
        cost: what a plan minimises: 'time' or 'flops' (see `memfit.plan`).
        training_only: checkpoint only while training (grad enabled); otherwise the blocks simply run.

    Returns:
        `model`, checkpointed. Plans are cached (NOTE [plan cache]): calling this every step plans once.
    """
    if not isinstance(model, torch.nn.Module):
        return wrap(model, strategy)  # which says what it takes
    s = schedule.parse(strategy if budget is None else Budget.parse(budget))
    if s.budget is None and batch is not None and loss_fn is not None:  # NOTE [blocks called several times]
        blocks = blocks_of(model, batch, loss_fn, blocks)  # (a budget's plan names the calls itself)
    strategy = resolve_plan(s, model, batch, loss_fn, blocks, cost) or s.strategy
    applied = applied_strategy(model)
    if (
        isinstance(strategy, Plan)
        and applied
        and applied["units"] == strategy.units
        and applied["blocks"] == [b.name for b in strategy.blocks]
    ):
        return model  # the same plan is already in place
    return wrap(model, strategy, blocks, state_replay, training_only=training_only)
