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
the peak model of `memfit.profiling.Profile`. That model is additive and
therefore approximate where blocks interact; so the chosen plan's peak is then
simulated exactly (fake tensors, see `memfit.profiling`). If the simulation
exceeds the budget, the planner solves again with the budget lowered by the
excess, until the simulated peak fits. The predicted peak it reports is the
simulated one: on CPU it is what the step will measure, to the byte.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field

import torch

from memfit import strategies
from memfit.wrapping import apply as apply_strategy
from memfit.wrapping import applied_strategy
from memfit.blocks import find_blocks
from memfit.errors import MemfitError
from memfit.profiling import MEASURED, CoverageWarning, Profile, available_cpu_bytes, coverage_warning, profile, simulate
from memfit.report import fmt_bytes
from memfit.strategies import KEEP, OFFLOAD, RECOMPUTE, Unit

__all__ = ["plan", "Plan", "parse_budget", "solve", "resolve_plan", "apply"]

BINS = 1000
UNIFORM_FALLBACKS = ("pointwise", "scores", "selective", "every:3", "every:2", "blocks", "sqrt")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(-?\s*(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z]*)\s*$", re.IGNORECASE)
BUDGET_HELP = "a size like 20GiB or 800MB, a percentage of the plain run's peak like 60%, or auto"


def available_bytes(device) -> int:
    """Free memory on `device`, minus a 10% safety margin."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_allocated(device)  # what this process holds is ours to plan with
    else:
        free = available_cpu_bytes()
    return int(free * 0.9)


def parse_budget(budget, baseline_peak: int | None = None, device="cpu") -> int:
    """Bytes for a budget: bytes (int), '20GiB', '800MB', '60%' of `baseline_peak`, or 'auto'."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget > 0:
            return int(budget)
        raise MemfitError(f"budget {budget} must be positive; give {BUDGET_HELP}.")
    text = str(budget).strip()
    if text.lower() == "auto":
        return available_bytes(device)
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = float("nan")
        if not 0 < pct <= 100:
            raise MemfitError(f"budget {text} must be a percentage above 0% and at most 100% of the plain "
                              f"run's peak; give {BUDGET_HELP}.")
        if baseline_peak is None:
            raise MemfitError("a percentage budget needs the plain run's peak; give a size like 20GiB instead.")
        return int(baseline_peak * pct / 100)
    m = _BUDGET.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise MemfitError(f"cannot read budget {text!r}; give {BUDGET_HELP}.")
    value = float(m.group(1).replace(" ", "")) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise MemfitError(f"budget {text} must be positive; give {BUDGET_HELP}.")
    return int(value)


@dataclass(frozen=True)
class _Candidate:
    start: int
    stop: int
    mode: str
    kept: float
    need: float       # bytes above `start` + kept-before that the unit's peak needs
    cost: float


def _candidates(prof: Profile, kind: str) -> list[_Candidate]:
    """Every unit the plan may use: each block alone in each mode, and every
    segment of two or more consecutive recomputed blocks."""
    n, kept, work, tr, other = len(prof.names), prof.kept, prof.work, prof.transient, prof.other
    starts = [sum(prof.chain_sizes[:k]) for k in range(len(prof.chain_sizes))]
    out = []
    for b in range(1, n + 1):
        i = b - 1
        first = max(s for s in starts if s <= i)  # a segment stays inside its chain
        for mode in prof.modes:
            if mode == OFFLOAD and kind == "flops":  # costs time, not FLOPs
                continue
            need = max(other[i] + kept[mode][i] + work[mode][i], tr[mode][i])
            out.append(_Candidate(i, b, mode, kept[mode][i], need, prof.cost(mode, i, kind)))
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
        src = best[c.start][:limit + 1] + c.cost
        dst = best[c.stop][kb:kb + limit + 1]
        better = src < dst
        dst[better] = src[better]
        came[c.stop][kb:kb + limit + 1][better] = idx
    last = math.floor((avail - prof.head) / step)
    if last < 0:
        return None
    final = best[n][:min(last, bins) + 1]
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


@dataclass
class BlockChoice:
    name: str
    mode: str                 # keep, pointwise, scores, selective or recompute
    segment: list | None      # [first, last] block names of its segment, if recomputed with others
    kept_bytes: int           # what it keeps through the forward
    cost: float               # its share of the plan's overhead (fraction of a plain step)


@dataclass
class Plan:
    """Per block, the strategy chosen, the bytes it keeps and what it costs;
    for the step, the predicted peak and overhead. Data: `to_json` /
    `from_json`, and `memfit.apply(model, plan)` on any model of the same shape."""

    blocks: list
    budget_bytes: int
    predicted_peak_bytes: int
    baseline_peak_bytes: int
    predicted_overhead: float   # recomputation cost as a fraction of a plain step's
    cost: str                   # "time" or "flops"
    predicted_recompute_flops: float  # matmul FLOPs recomputed, fraction of a plain step's
    signature: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # where each number came from (see `_sources`)
    coverage: float | None = None  # share of the plain step's saved activations inside the blocks

    @property
    def units(self) -> list[Unit]:
        units, i = [], 0
        while i < len(self.blocks):
            b = self.blocks[i]
            size = 1
            if b.segment:
                size = 1 + next(k for k in range(i, len(self.blocks)) if self.blocks[k].name == b.segment[1]) - i
            units.append(Unit(i, i + size, b.mode))
            i += size
        return units

    def __str__(self) -> str:
        kind = "time" if self.cost == "time" else "FLOPs"
        width = max(len(b.name) for b in self.blocks)
        lines = [f"plan for a budget of {fmt_bytes(self.budget_bytes)} (plain run: "
                 f"{fmt_bytes(self.baseline_peak_bytes)}): predicted peak {fmt_bytes(self.predicted_peak_bytes)}, "
                 f"+{self.predicted_overhead:.1%} {kind}"]
        for b in self.blocks:
            line = f"  {b.name:<{width}}  {b.mode:<9}  keeps {fmt_bytes(b.kept_bytes):>10}"
            if b.cost:
                line += f"  +{b.cost:.1%} {kind}"
            if b.segment:
                line += f"  (segment {b.segment[0]}..{b.segment[1]})"
            lines.append(line)
        lines += [f"  {what}: {where}" for what, where in self.sources.items()]
        if self.coverage is not None:
            lines.append(f"  coverage: {self.coverage:.0%} of the plain step's saved activations lie inside these "
                         f"{len(self.blocks)} blocks")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            data["blocks"] = [BlockChoice(**b) for b in data["blocks"]]
            plan = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            plan._validate()
            return plan
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise MemfitError(f"not a memfit plan ({e}); make one with `memfit plan --json PATH` "
                              f"or Plan.to_json().") from None

    def _validate(self) -> None:
        """Raise ValueError unless the blocks form units: known modes, segments of consecutive blocks."""
        if not self.blocks:
            raise ValueError("it has no blocks")
        names = [b.name for b in self.blocks]
        for i, b in enumerate(self.blocks):
            if b.mode not in strategies.MODES:
                raise ValueError(f"block {b.name} has unknown mode {b.mode!r}")
            if b.segment is not None:
                if (not isinstance(b.segment, list) or len(b.segment) != 2 or b.segment[0] not in names
                        or b.segment[1] not in names
                        or not names.index(b.segment[0]) <= i <= names.index(b.segment[1])):
                    raise ValueError(f"block {b.name} names segment {b.segment!r}, which does not contain it")
        units = self.units
        if any(u.stop - u.start > 1 and any(b.segment != self.blocks[u.start].segment or b.mode != u.mode
                                              for b in self.blocks[u.start:u.stop]) for u in units):
            raise ValueError("a segment's blocks disagree on their segment or mode")

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise MemfitError(f"cannot read plan {path}: {e.strerror}; give the path of a plan JSON file.") from None
        except UnicodeDecodeError:
            raise MemfitError(f"plan {path} is not a text file; give a plan JSON file made by `memfit plan "
                              f"--json`.") from None
        return cls.from_json(text)

    def check(self, names: list[str]) -> None:
        """Raise unless this plan was made for blocks with these names (in any order)."""
        mine = [b.name for b in self.blocks]
        if sorted(mine) != sorted(names):
            raise MemfitError(f"this plan was made for a model with {len(mine)} blocks ({mine[0]}..{mine[-1]}), "
                              f"not this one with {len(names)} ({names[0]}..{names[-1]}); make a plan for this "
                              f"model with memfit.plan or `memfit plan`.")


def _sources(prof: Profile, cost: str) -> dict:
    """Where the plan's numbers come from: memory and FLOPs simulated on fake
    tensors or measured on real steps (and why), cost timed or counted."""
    memory = prof.memory_source + (f": {prof.real_steps_because}" if prof.real_steps_because else "")
    return {"memory": memory,
            "flops": "counted on real steps on a CPU copy" if prof.memory_source == MEASURED else
                     "counted on fake tensors",
            "cost": "timed steps on " + prof.device if cost == "time" else "FLOPs counted",
            "segments": "offered" if prof.segments else "not offered: this chain's blocks cannot form segments"}


def _choices(prof: Profile, units, kind) -> list[BlockChoice]:
    step = prof.step_cost(kind)
    out = []
    for u in units:
        segment = [prof.names[u.start], prof.names[u.stop - 1]] if u.stop - u.start > 1 else None
        for i in range(u.start, u.stop):
            kept = prof.kept[u.mode][i] if (segment is None or i == u.stop - 1) else 0
            out.append(BlockChoice(prof.names[i], u.mode, segment, int(kept), prof.cost(u.mode, i, kind) / step))
    return out


def _minimum_budget(prof: Profile, kind: str) -> float:
    """The smallest budget the peak model finds a plan for (bisection)."""
    lo, hi = max(prof.tail, prof.start), prof.baseline_peak_bytes * 2
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
        units = strategies.parse(name, prof.chain_sizes)
        if not prof.segments and any(u.stop - u.start > 1 and u.mode != KEEP for u in units):
            continue
        total = sum(prof.cost(u.mode, i, cost) for u in units for i in range(u.start, u.stop))
        if (found is None or total < found[1]) and (peak := peak_of(units)) <= budget_bytes:
            found = (units, total, peak)
    return found


def signature(model, batch, blocks=None) -> dict:
    """What a plan depends on: the chain, the parameters' and inputs' shapes."""
    from torch.utils._pytree import tree_leaves
    return {"model": type(model).__name__,
            "blocks": [n for n, _ in find_blocks(model, blocks)],
            "parameters": sum(p.numel() for p in model.parameters()),
            "inputs": [[list(t.shape), str(t.dtype)] for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]}


_CACHE: dict = {}


def plan(model, batch, loss_fn, budget, *, blocks=None, cost="time", optimizer=None, distributed=None) -> Plan:
    result = plan_or_none(model, batch, loss_fn, budget, blocks=blocks, cost=cost, optimizer=optimizer,
                          distributed=distributed)
    if isinstance(result, Plan):
        return result
    prof, budget_bytes = result
    minimum = _minimum_budget(prof, cost)
    solution = solve(prof, minimum, cost, bins=200)
    reachable = minimum
    if solution:
        reachable = simulate(model, batch, loss_fn, solution[0], blocks=prof.names, optimizer=optimizer,
                             distributed=distributed, real=prof.memory_source == MEASURED, seed=prof.seed).peak_bytes
    raise MemfitError(f"budget {fmt_bytes(budget_bytes)} is below the smallest peak checkpointing reaches for this "
                      f"model and batch, about {fmt_bytes(max(reachable, minimum))} (plain run: "
                      f"{fmt_bytes(prof.baseline_peak_bytes)}); give a budget of at least that, or a smaller batch.")


def plan_or_none(model, batch, loss_fn, budget, *, blocks=None, cost="time", optimizer=None, distributed=None):
    """The cheapest plan whose predicted peak fits `budget`.

    `budget`: bytes, '20GiB', '800MB', '60%' (of the plain run's peak, with
    the same batch and optimizer), or 'auto' (free device memory less 10%).
    `cost`: 'time' (measured, the default) or 'flops' (deterministic).
    `optimizer`: the optimizer class whose state counts (default AdamW).
    `distributed`: ("ddp" | "fsdp", world size) plans for one rank of that
    run, `batch` being the rank's share (see `memfit.distributed.rank_timeline`);
    budgets and peaks are then per rank.
    Plans are cached by model shape, input shapes, budget and cost, so calling
    this every step re-plans only when the shapes change. `plan_or_none`
    returns (profile, budget bytes) instead of raising when no plan fits.
    """
    if cost not in ("time", "flops"):
        raise MemfitError(f"unknown cost {cost!r}; use time (measured) or flops (deterministic).")
    sig = signature(model, batch, blocks)
    key = json.dumps([sig, str(budget), cost, str(blocks), getattr(optimizer, "__name__", None), distributed],
                     sort_keys=True)
    if key in _CACHE:
        return _CACHE[key]
    device = next(model.parameters()).device
    parse_budget(budget, baseline_peak=1, device=device)  # a bad budget fails before profiling
    prof = profile(model, batch, loss_fn, blocks=blocks, optimizer=optimizer, timing=cost == "time",
                   distributed=distributed)
    budget_bytes = parse_budget(budget, prof.baseline_peak_bytes, device)
    peaks = {tuple(strategies.parse(name, prof.chain_sizes)): peak for name, peak in prof.uniform_peaks.items()}

    def peak_of(units):
        key = tuple(units)
        if key not in peaks:
            peaks[key] = simulate(model, batch, loss_fn, units, blocks=prof.names, optimizer=optimizer,
                                  distributed=distributed, real=prof.memory_source == MEASURED,
                                  seed=prof.seed).peak_bytes
        return peaks[key]
    found = _search(prof, budget_bytes, cost, peak_of)
    if found is not None:
        units, total, peak = found
        recomputed = sum(prof.recomputed_flops(u.mode, i) for u in units for i in range(u.start, u.stop))
        result = Plan(_choices(prof, units, cost), budget_bytes, peak, prof.baseline_peak_bytes,
                      total / prof.step_cost(cost), cost, recomputed / prof.step_flops, sig, _sources(prof, cost),
                      prof.coverage)
        if (warning := coverage_warning(prof.coverage)) is not None:
            warnings.warn(f"memfit: {warning}.", CoverageWarning, stacklevel=3)
        _CACHE[key] = result
        return result
    return prof, budget_bytes


def resolve_plan(strategy, model, batch, loss_fn, blocks=None, cost="time"):
    """A `Plan` for `plan:BUDGET` (planned now for this batch), `plan:FILE.json`
    (loaded) or a Plan; None for other strategies."""
    if isinstance(strategy, Plan):
        return strategy
    if not isinstance(strategy, str) or not strategy.strip().lower().startswith("plan:"):
        return None
    arg = strategy.strip()[len("plan:"):]
    if arg.endswith(".json"):
        return Plan.load(arg)
    if batch is None or loss_fn is None:
        raise MemfitError(f"strategy {strategy!r} plans for a batch: give batch= and loss_fn= too, or a plan file "
                          f"(plan:PATH.json).")
    return plan(model, batch, loss_fn, arg, blocks=blocks, cost=cost)


def apply(model, strategy="blocks", blocks=None, state_replay=True, *, budget=None, batch=None, loss_fn=None,
          cost="time", training_only=True):
    """`memfit.apply`: checkpoint the blocks of `model` (`memfit.wrapping.apply`,
    which this calls), plans included: a `Plan`, `plan:FILE.json`, and
    `plan:60%` or `budget=` ('60%', '8GiB', 'auto') with `batch` and
    `loss_fn`, planned first (cached by shapes: calling this every step plans
    once). Returns `model`."""
    if not isinstance(model, torch.nn.Module):
        return apply_strategy(model, strategy)  # which says what it takes
    if budget is not None:
        if batch is None or loss_fn is None:
            raise MemfitError("apply(model, budget=...) needs batch= and loss_fn= to plan with.")
        strategy = plan(model, batch, loss_fn, budget, blocks=blocks, cost=cost)
    strategy = resolve_plan(strategy, model, batch, loss_fn, blocks, cost) or strategy
    applied = applied_strategy(model)
    if isinstance(strategy, Plan) and applied and applied["units"] == strategy.units and \
            applied["blocks"] == [b.name for b in strategy.blocks]:
        return model  # the same plan is already in place
    return apply_strategy(model, strategy, blocks, state_replay, training_only=training_only)
