"""The largest batch that fits a memory budget, with each strategy.

Peaks come from simulated steps (fake tensors, counted by the storage
tracker: exactly what a CPU step allocates), so the search costs no compute.
Peak memory grows almost linearly with the batch size: two probes give the
slope, and a bracketing search around the estimate finds the exact largest
batch. On CUDA the batch found is then confirmed with real steps, stepping
down after an out-of-memory error (the failed step's tensors are released
and the allocator's cache emptied, so nothing leaks).
"""

from __future__ import annotations

import gc

import torch

from memfit.core.measurement import measure
from memfit.core.memory import fmt_bytes
from memfit.errors import MemfitError
from memfit.planning.planner import plan, plan_or_none
from memfit.planning.profiling import FASTER
from memfit.planning.simulation import SIMULATED, batch_dims, simulate

STRATEGIES = ("none", "blocks", "sqrt", "selective", "plan")
LIMIT = 1 << 20


def largest_batch(
    model, make_batch, loss_fn, strategy, budget: int, *, blocks=None, optimizer=None, at_least=1, distributed=None
):
    """(largest batch size whose peak fits `budget`, its peak bytes); (0, peak
    at batch 1) if not even one sample fits. `strategy` "plan" plans for the
    budget at each batch size tried; None keeps the model as it is wrapped.
    `at_least`: a batch size known to fit (the search starts there).
    `distributed`: ("ddp" | "fsdp", world size): the batch of one rank, and its peak."""
    cache = {}
    template = make_batch(1)
    dims = batch_dims(template, make_batch(2))
    checked = False  # the simulated step was found to be the real one, at the first batch planned

    def peak(b):
        nonlocal checked
        if b not in cache:
            if strategy == "plan":  # plans are made on real batches; their real step is checked once
                p = plan_or_none(
                    model,
                    make_batch(b),
                    loss_fn,
                    budget,
                    blocks=blocks,
                    cost="flops",
                    optimizer=optimizer,
                    distributed=distributed,
                    checked=checked,
                )
                memory = p.sources["memory"] if p is not None else ""
                checked = checked or memory.startswith(SIMULATED) or FASTER in memory  # equal to the real step
                cache[b] = p.predicted_peak_bytes if p is not None else float("inf")
            else:  # other strategies on a batch of b fake rows: no data is made
                cache[b] = simulate(
                    model,
                    template,
                    loss_fn,
                    strategy,
                    blocks=blocks,
                    optimizer=optimizer,
                    resize=(b, dims),
                    distributed=distributed,
                ).peak_bytes
        return cache[b]

    return _search(peak, budget, at_least)


def _search(peak, budget: int, at_least: int):
    """(largest batch b with peak(b) <= budget, its peak): a gallop from an estimate, then a bisection."""

    def fits(b):
        return peak(b) <= budget

    if not fits(1):
        return 0, peak(1)
    if at_least > 1:
        guess = at_least
    else:
        slope = (peak(8) - peak(1)) / 7 if fits(8) else 0
        guess = int(1 + (budget - peak(1)) / slope) if slope > 0 else 8
    lo, hi, step = 1, None, 1  # lo fits; hi, once known, does not
    probe = max(1, min(guess, LIMIT))
    if fits(probe):  # gallop up from the estimate
        lo = probe
        while hi is None and lo < LIMIT:
            nxt = min(LIMIT, lo + step)
            lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
            step *= 2
        if hi is None:
            return lo, peak(lo)
    else:  # gallop down from the estimate
        hi = probe
        while hi - step > lo and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(lo, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, peak(lo)


def _confirm_on_cuda(model, make_batch, loss_fn, strategy, size, budget, blocks):
    """Real steps at `size`, stepping down 5% after each out-of-memory error."""
    while size > 0:
        try:
            return size, measure(
                model,
                make_batch(size),
                loss_fn,
                _strategy(model, make_batch(size), loss_fn, strategy, budget, blocks),
                blocks=blocks,
                timed_steps=1,
            )
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            size = int(size * 0.95)
    return 0, None


def _strategy(model, batch, loss_fn, strategy, budget, blocks):
    return plan(model, batch, loss_fn, budget, blocks=blocks, cost="flops") if strategy == "plan" else strategy


def fit(model, make_batch, loss_fn, budget: int, strategies=STRATEGIES, *, blocks=None, timing=True) -> list[dict]:
    """One row per strategy: `strategy`, `batch_size`, `peak_bytes`,
    `time_per_sample_s` (one real step at that batch, after a warm-up step;
    None without `timing`), `memory_source`. For "plan", the largest batch
    for which a plan fits."""
    device = next(model.parameters()).device
    rows: list[dict] = []
    smallest = float("inf")  # the peak of a batch of 1, where no batch fits
    for s in strategies:
        best = max((r["batch_size"] for r in rows), default=1)  # a plan fits at least what a strategy fits
        size, peak = largest_batch(
            model, make_batch, loss_fn, s, budget, blocks=blocks, at_least=best if s == "plan" else 1
        )
        if not size:
            smallest = min(smallest, peak)
        row = {
            "strategy": s,
            "batch_size": size,
            "peak_bytes": peak if size else None,
            "time_per_sample_s": None,
            "memory_source": "simulated storage-tracker",
        }
        if size and device.type == "cuda":
            size, measured = _confirm_on_cuda(model, make_batch, loss_fn, s, size, budget, blocks)
            row.update(
                batch_size=size,
                peak_bytes=measured and measured["peak_bytes"],
                time_per_sample_s=measured and measured["step_time_s"] / size,
                memory_source="cuda-allocator",
            )
        elif size and timing:
            batch = make_batch(size)
            timed = measure(
                model,
                batch,
                loss_fn,
                _strategy(model, batch, loss_fn, s, budget, blocks),
                blocks=blocks,
                timed_steps=1,
                memory=False,
                flops=False,
            )
            row["time_per_sample_s"] = timed["step_time_s"] / size
        rows.append(row)
    if rows and not any(r["batch_size"] for r in rows):
        least = (
            f"a batch of 1 peaks at {fmt_bytes(smallest)} at the least"
            if smallest != float("inf")
            else "no plan fits a batch of 1"
        )
        raise MemfitError(
            f"a budget of {fmt_bytes(budget)} fits no batch with any of {', '.join(strategies)}: "
            f"{least}; give a larger budget."
        )
    return rows
