"""What each block costs under each strategy: bytes kept through the forward,
bytes needed at its backward, FLOPs and time. The planner's input.

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

How memory is simulated: NOTE [simulated steps] in memfit.planning.simulation; where costs come from:
memfit.planning.frontier.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memfit.core.blocks import find_blocks, find_chains
from memfit.core.memory import available_cpu_bytes
from memfit.core.strategies import (
    KEEP,
    MODES,
    OFFLOAD,
    POINTWISE,
    RECOMPUTE,
    SCORES,
    SELECTIVE,
    Mode,
    Unit,
)
from memfit.errors import MemfitError
from memfit.planning.frontier import alike, block_cost, frontiers, recomputed_ops, record_ops, saved_by
from memfit.planning.simulation import MEASURED, SIMULATED, Simulation, blocks_of, device_of, simulate
from memfit.planning.timemodel import TimeModel, calibrate

__all__ = ["profile", "simulate", "Profile", "Point", "coverage", "FASTER"]

# why a profile ran real steps although its simulated step was found equal to the real one
FASTER = "a real step of this model takes"

STRATEGY_OF = {
    KEEP: "none",
    RECOMPUTE: "blocks",
    SELECTIVE: "selective",
    SCORES: "scores",
    POINTWISE: "pointwise",
    OFFLOAD: "offload",
}  # the strategy that applies the mode to every block
HOST_MODES = tuple(m for m in MODES if m != OFFLOAD)


def modes_for(device) -> tuple:
    """The modes worth profiling on `device`: offloading to the CPU only helps a model on CUDA."""
    return MODES if torch.device(device).type == "cuda" else HOST_MODES


@dataclass(frozen=True)
class Point:
    """The `index`-th point (from 1) of the blocks' op-level frontiers (NOTE [op-level frontier]): a mode of
    each block's own, or with `on_demand` their twins that recompute on demand. Printed `ops/1`, `lazy/1`."""

    index: int
    on_demand: bool = False

    def __str__(self) -> str:
        return f"{'lazy' if self.on_demand else 'ops'}/{self.index}"


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

    The columns m of these tables are modes (`keep`, `recompute`, the presets,
    `offload`) and the op-level frontier's points (`Point`, printed `ops/1`,
    `lazy/1`, ...), which stand for a mode of each block's own
    (`points[point][i]`, an op-level mode: NOTE [op-level frontier]). `costs[kind][m][i]` is what recomputing block i
    under m costs: `flops` (matmul FLOPs plus one per element of the other
    ops) or `time` (seconds, NOTE [time model] in memfit.planning.timemodel);
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
    transient: dict  # rise inside each block's forward, per mode
    costs: dict  # kind -> mode -> per block
    recomputed: dict  # mode -> per block: matmul FLOPs recomputed
    step_flops: int  # FLOPs of a plain training step
    step_time_s: float | None = None  # a plain step, predicted by the time model
    modes: tuple = HOST_MODES  # the columns profiled: modes (offload only on CUDA) and op-level points
    points: dict = field(default_factory=dict)  # Point -> each block's op-level mode
    time_model: TimeModel | None = None  # what the time costs come from (cost "time")
    memory_source: str = SIMULATED  # or MEASURED: see NOTE [real steps]
    uniform_peaks: dict | None = None  # the simulated peak of each mode used for every block
    real_steps_because: str | None = None
    seed: int | None = None  # the RNG seed of the real steps
    segments: bool = True  # whether the chains' blocks can be recomputed as segments
    chains: list | None = None  # the length of each chain, in the order of `names`
    coverage: float | None = None  # share of the plain step's saved activations inside the blocks
    fixed: list = field(default_factory=list)  # blocks left plain: they have no backward (not in `names`)

    @property
    def chain_sizes(self) -> list:
        return self.chains or [len(self.names)]

    def column(self, mode: Mode, i: int) -> Mode | Point:
        """The column of the tables that holds block i under `mode`: the mode, or the point an op-level mode of
        block i belongs to (the first, where several points give block i that mode)."""
        if not mode.op_level:
            return mode
        if "_columns" not in self.__dict__:
            self._columns: dict = {}
            for point, per_block in self.points.items():
                for k, m in enumerate(per_block):
                    self._columns.setdefault((k, m), point)
        return self._columns[i, mode]

    def mode(self, column: Mode | Point, i: int) -> Mode:
        """The mode block i is applied with under `column`."""
        return self.points[column][i] if isinstance(column, Point) else column

    def recomputed_flops(self, mode: Mode, i: int) -> int:
        """Matmul / convolution / attention FLOPs recomputed for block i."""
        return self.recomputed[self.column(mode, i)][i]

    def cost(self, mode: Mode, i: int, kind: str) -> float:
        """What recomputing block i under `mode` costs: FLOPs or seconds."""
        return self.costs[kind][self.column(mode, i)][i]

    def step_cost(self, kind: str) -> float:
        if kind == "flops" or self.step_time_s is None:
            return float(self.step_flops)
        return self.step_time_s


def _costs(points: dict, reads: dict, rec, model) -> tuple:
    """(costs[kind][mode][i], recomputed matmul FLOPs[mode][i]) from the ops recorded (`block_cost`)."""
    n = len(rec.blocks)
    mode_of = lambda m, i: points[m][i] if isinstance(m, Point) else m  # noqa: E731
    costs = {
        kind: {
            m: [block_cost(mode_of(m, i), rec.blocks[i], rec.flows[i], kind, model) for i in range(n)]
            for m in reads
            if m != OFFLOAD
        }
        for kind in (("flops", "time") if model else ("flops",))
    }
    costs["flops"][OFFLOAD] = [float("inf")] * n
    if model and OFFLOAD in reads:  # to the host and back: NOTE [time model]
        costs["time"][OFFLOAD] = [2 * k * (model.per_offloaded_byte or 0) for k in reads[KEEP]["kept"]]
    recomputed = {
        m: [sum(op.flops for op in recomputed_ops(mode_of(m, i), rec.blocks[i], rec.flows[i])) for i in range(n)]
        for m in reads
        if m != OFFLOAD
    }
    recomputed[OFFLOAD] = [0] * n
    return costs, recomputed


def _estimate(points: dict, reads: dict, rec) -> dict:
    """The peak model's terms of each op-level point, from `recompute`'s
    (NOTE [op-level frontier]): its outputs saved add their bytes to what the
    block keeps and take them off what its backward rematerialises; the rise
    inside the forward is taken as recompute's plus all of them (an upper bound)."""
    rc = reads[RECOMPUTE]
    out = {}
    for point, modes in points.items():
        extra = [
            sum(rec.blocks[i][k].new_bytes for k in saved_by(m, rec.blocks[i])) if m.op_level else 0
            for i, m in enumerate(modes)
        ]
        out[point] = {
            "kept": [k + e for k, e in zip(rc["kept"], extra)],
            "work": [max(w - e, wk) for w, e, wk in zip(rc["work"], extra, reads[KEEP]["work"])],
            "transient": [t + e for t, e in zip(rc["transient"], extra)],
        }
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
    transient = [max(live[at[f"f<{i}"] : at[f"f>{i}"] + 1]) - live[at[f"f<{i}"]] for i in range(n)]
    backward_start = [live[b[i]] for i in range(n)]
    ends = [b[i - 1] if i and b[i - 1] != done else min((k for k in b if k > b[i]), default=done) for i in range(n)]
    work = [max(live[b[i] : max(ends[i], b[i]) + 1]) - backward_start[i] for i in range(n)]
    start = live[at["f<0"]]
    head = (
        max(live[at[f"f>{n - 1}"] : min(b) + 1]) - live[at[f"f>{n - 1}"]]
        if b[n - 1] == done
        else max(live[at[f"f>{n - 1}"] : b[n - 1] + 1]) - live[at[f"f>{n - 1}"]]
    )
    tail = max(live[at["backward done"] :])
    return dict(
        kept=kept, transient=transient, backward_start=backward_start, work=work, start=start, head=head, tail=tail
    )


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
            sim = simulate(
                model, batch, loss_fn, "none", blocks=blocks, marks=True, real=real, seed=0 if real else None
            )
        except MemfitError:
            raise
        except Exception:
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
    return (
        f"only {share:.0%} of the plain step's saved activations lie inside the blocks, so "
        f"checkpointing them saves at most that much; name more blocks with blocks=..., "
        f"e.g. 'encoder.layers|decoder.layers'"
    )


def _all_ran(sim: Simulation, n: int) -> bool:
    labels = {label for label, _ in sim.timeline}
    return all(f"f<{i}" in labels for i in range(n))


def _source(model, batch, loss_fn, n, checked=False, **kw) -> tuple:
    """How to profile: (real, seed, why, the plain step's simulation). See NOTE [real steps]. `checked`: the
    simulation of this model was found equal to its real step at a smaller batch; no real step again."""
    try:
        t0 = time.perf_counter()
        fake = simulate(model, batch, loss_fn, "none", **kw)
        fake_s = time.perf_counter() - t0
    except MemfitError:
        raise
    except Exception as e:
        why = f"the simulation cannot run this model's step ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if next(model.parameters()).is_meta:  # NOTE [the real path on fake tensors]: no real step to stand in
            raise MemfitError(f"{why}, and the model is on the meta device, so no real step can stand in.") from None
    else:
        if checked or next(model.parameters()).device.type != "cpu" or fake.peak_bytes > available_cpu_bytes() / 2:
            return False, None, None, fake  # a real step would not fit beside the model: trust the simulation
        t0 = time.perf_counter()
        real = simulate(model, batch, loss_fn, "none", real=True, seed=0, **kw)
        real_s = time.perf_counter() - t0
        if real.peak_bytes != fake.peak_bytes or not _all_ran(fake, n):
            why = (
                f"the simulated step peaks {fake.peak_bytes / real.peak_bytes - 1:+.2%} off the real one "
                f"(the model takes another path on fake tensors)"
            )
            if _all_ran(real, n):
                return True, 0, why, real
        elif real_s < fake_s and _all_ran(real, n):
            return True, 0, f"{FASTER} {real_s:.2f} s, simulating it {fake_s:.2f} s", real
        else:
            return False, None, None, fake
    for seed in range(16):
        sim = simulate(model, batch, loss_fn, "none", real=True, seed=seed, **kw)
        if _all_ran(sim, n):
            return True, seed, why, sim
    raise MemfitError(
        f"the model skipped some of its {n} blocks in each of 16 training steps tried, so memfit "
        f"cannot profile them; lower the model's layer-drop probability while planning."
    )


def _without_fixed(plain: Simulation, names: list) -> tuple:
    """NOTE [blocks without a backward]: (the plain step, the blocks, the blocks left plain), where the blocks
    are those whose backward ran in the plain step, unless none or all did."""
    labels = {label for label, _ in plain.timeline}
    kept = [i for i in range(len(names)) if f"b<{i}" in labels]
    if len(kept) in (0, len(names)):
        return plain, names, []
    return _renumbered(plain, kept), [names[i] for i in kept], [n for i, n in enumerate(names) if i not in kept]


def _renumbered(sim: Simulation, kept: list) -> Simulation:
    """`sim` with the marks of the blocks `kept` (their indices) numbered 0, 1, ... and the other blocks' left out."""
    new = {str(i): str(j) for j, i in enumerate(kept)}
    timeline = [
        (label[:2] + new[label[2:]] if label[:2] in ("f<", "f>", "b<") else label, live)
        for label, live in sim.timeline
        if label[:2] not in ("f<", "f>", "b<") or label[2:] in new
    ]
    return dataclasses.replace(sim, timeline=timeline)


def _each_point(points: dict, groups: list, simulated) -> dict:
    """{point: the peak model's terms (`_read`)} of each op-level point (NOTE [op-level frontier]), from
    simulated steps (`simulated(units)`). Blocks alike (`groups`, lists of block indices) share their terms,
    so one step runs a different point on each of them: a chain of g alike blocks needs 1/g of the steps. A
    step that fails ends it, with a warning: the plan keeps to the other modes."""
    labels, n = list(points), sum(map(len, groups))
    terms = {label: {k: [0] * n for k in ("kept", "work", "transient")} for label in labels}
    for step in range(max((-(-len(labels) // len(g)) for g in groups), default=0)):
        at = {i: min(step * len(g) + r, len(labels) - 1) for g in groups for r, i in enumerate(g)}
        try:
            got = _read(simulated([Unit(i, i + 1, points[labels[at[i]]][i]) for i in range(n)]), n)
        except Exception as e:
            warnings.warn(f"memfit: recompute on demand left out of the plan, its step failed: {e}", stacklevel=2)
            return {}
        for g in groups:
            for r, i in enumerate(g):
                if step * len(g) + r < len(labels):
                    for k, per_block in terms[labels[at[i]]].items():
                        for j in g:
                            per_block[j] = got[k][i]
    return terms


def _points(per_block: list) -> tuple[dict, dict]:
    """The op-level points offered to the planner, {Point: [mode of each block]}: the j-th point takes each
    block's j-th frontier mode (its last if it has fewer); and their on-demand twins."""
    points = {
        Point(j + 1): [modes[min(j, len(modes) - 1)] if modes else RECOMPUTE for modes in per_block]
        for j in range(max(map(len, per_block), default=0))
    }
    lazy = {Point(p.index, on_demand=True): [m.lazy() for m in modes] for p, modes in points.items()}
    return points, lazy


def _uniform(run: Callable, device, plain) -> dict:
    """{mode: its simulated step} for keep (`plain`), recompute, the presets and, on CUDA, offload (left out,
    with a warning, if its simulation fails). `run(strategy, marks=True)` simulates one."""
    sims = {KEEP: plain}
    for m in modes_for(device):
        if m == KEEP:
            continue
        try:
            sims[m] = run(STRATEGY_OF[m], marks=True)
        except Exception as e:
            if m != OFFLOAD:
                raise
            warnings.warn(f"memfit: offload left out of the plan, its simulation failed: {e}", stacklevel=3)
    return sims


def _reads(sims: dict, points: dict, lazy: dict, rec, run: Callable, n: int) -> dict:
    """{mode or point: what its step's timeline says of each of the `n` blocks}: the uniform modes' `sims`, the
    on-demand points simulated once per group of alike blocks, the other points estimated from them. The
    on-demand points that could be read join `points`."""
    reads = {m: _read(sim, n) for m, sim in sims.items()}
    keys = alike(rec)
    groups = [[i for i in range(n) if keys[i] == k] for k in dict.fromkeys(keys)]
    reads.update(_each_point(lazy, groups, lambda units: run(units, marks=True)))
    reads.update(_estimate(points, reads, rec))
    points.update({point: modes for point, modes in lazy.items() if point in reads})
    return reads


def profile(
    model: torch.nn.Module,
    batch: object,
    loss_fn: Callable,
    *,
    blocks: object = None,
    optimizer: type | None = None,
    cost: str = "flops",
    distributed: object = None,
    checked: bool = False,
) -> Profile:
    """Profile each block of `model`'s chains under each mode (keep, recompute, the presets, offload on CUDA,
    and the points of each block's op-level frontier for the `cost` kind): the planner's input. Memory and
    FLOPs are simulated (or measured on real steps where the simulation cannot be trusted, NOTE [real
    steps]); the model itself is not touched.

    Args:
        model: the model, as it will be trained.
        batch: one training batch, as `loss_fn` takes it.
        loss_fn: `loss_fn(model, batch)` returns the loss of a training step.
        blocks: the blocks to profile, if not the chains found (names, or a container's name).
        optimizer: the optimizer class whose state counts (default AdamW).
        cost: 'flops' (matmul FLOPs plus one per element of the other ops recomputed) or 'time' (the time
            model of the model's device, memfit.planning.timemodel).
        distributed: a `memfit.planning.sharding.Layout`: profile one rank of that run (see `simulate`).
        checked: the caller found this model's simulated step equal to its real step at a smaller batch (as
            `memfit fit` does once): the simulation is trusted without another real step.

    Returns:
        A `Profile`: per block and mode the bytes kept, the backward's rise and the recompute cost.
    """
    blocks = blocks_of(model, batch, loss_fn, blocks)  # NOTE [blocks called several times]
    names = [n for n, _ in find_blocks(model, blocks)]
    n = len(names)
    device = device_of(model)
    common = dict(blocks=blocks, optimizer=optimizer, distributed=distributed)
    real, seed, why, plain = _source(model, batch, loss_fn, n, checked, marks=True, **common)
    plain, names, fixed = _without_fixed(plain, names)  # NOTE [blocks without a backward]
    if fixed:
        n, blocks, common["blocks"] = len(names), names, names
    chains = [len(c) for c in find_chains(model, blocks)]
    model_t = calibrate(device) if cost == "time" else None
    rec = record_ops(model, batch, loss_fn, blocks=blocks, real=real, seed=seed)
    points, lazy = _points(frontiers(rec, cost, model_t))

    def run(strategy, **kw) -> Simulation:
        return simulate(model, batch, loss_fn, strategy, real=real, seed=seed, **common, **kw)

    sims = _uniform(run, "cpu" if real else device, plain)
    segments = max(chains) > 1 and not run("segments:1").split
    reads = _reads(sims, points, lazy, rec, run, n)
    keep, baseline = reads[KEEP], sims[KEEP]
    other = [keep["backward_start"][i] - keep["start"] - sum(keep["kept"][: i + 1]) for i in range(n)]
    costs, recomputed = _costs(points, reads, rec, model_t)
    return Profile(
        names=names,
        device=str(device),
        modes=tuple(reads),
        points=points,
        time_model=model_t,
        baseline_peak_bytes=baseline.peak_bytes,
        static_bytes=baseline.static_bytes,
        start=keep["start"],
        head=keep["head"],
        tail=keep["tail"],
        other=other,
        **{part: {m: r[part] for m, r in reads.items()} for part in ("kept", "work", "transient")},
        costs=costs,
        recomputed=recomputed,
        step_flops=rec.flops,
        step_time_s=model_t.seconds(rec.flops, rec.moved, rec.count) if model_t else None,
        memory_source=MEASURED if real else SIMULATED,
        real_steps_because=why,
        seed=seed,
        segments=segments,
        chains=chains,
        coverage=coverage_of(plain, n),
        fixed=fixed,
        uniform_peaks={STRATEGY_OF[m]: sim.peak_bytes for m, sim in sims.items() if m not in points},
    )
