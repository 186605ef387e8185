"""Did checkpointing change the training, and what did it buy? One report.

`verify` trains two copies of the same model from the same seed on the same
batch, one plain and one with a strategy applied, step by step and
interleaved, and compares:

* memory: the peak of one steady-state step (after a warm-up step created the
  optimizer state), from `memfit.track_memory`;
* time: the median of the timed steps, the two runs alternating which goes
  first;
* FLOPs: one step of each, so the recomputation shows as extra forward FLOPs;
* sameness: gradients after every step, losses, and at the end the buffers
  (BatchNorm running statistics) and parameters.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from memfit.core import strategies
from memfit.core.blocks import find_blocks
from memfit.core.measurement import Run, check_backend, run_of
from memfit.core.measurement import steps as run_steps
from memfit.core.schedule import Plan
from memfit.core.wrapping import resolve_units, wrap, wrapped_blocks
from memfit.errors import MemfitError
from memfit.planning.planner import resolve_plan
from memfit.planning.profiling import CoverageWarning, coverage, coverage_warning
from memfit.planning.simulation import blocks_of

__all__ = ["verify"]

# The backends whose min-cut partitioner takes torch._functorch.config.activation_memory_budget, and the budgets
# `verify` tries when it sets a plan against it (the partitioner's frontier is not monotonic in the budget).
PARTITIONED = ("aot_eager_decomp_partition", "inductor")
COMPILE_BUDGETS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.numel():
        return 0.0
    scale = a.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def _summary(run) -> dict:
    return {
        "peak_bytes": run.mem.peak_bytes,
        "static_bytes": run.mem.static_bytes,
        "activation_bytes": run.mem.activation_bytes,
        "step_time_s": statistics.median(run.times),
        "step_times_s": run.times,
        "flops": run.flops,
    }


def _failures(
    reduction, is_none, expect_reduction, grad_rel, buffer_diff, param_diff, loss_diff, grad_tol, first_loss
) -> list:
    """Why the checkpointed run is not the same training (or not the saving expected); empty if it is."""
    failures = []
    if expect_reduction is not None:
        lo, hi = expect_reduction
        if not lo <= reduction <= hi:
            failures.append(f"memory reduction {reduction:.1%} is outside the expected {lo:.0%}..{hi:.0%}")
    elif not is_none and reduction <= 0:
        failures.append(f"no memory saved (reduction {reduction:.1%})")
    if grad_rel > grad_tol:
        failures.append(f"gradients differ (max relative difference {grad_rel:.3g} > {grad_tol:g})")
    if buffer_diff > grad_tol:
        failures.append(f"buffers differ (max relative difference {buffer_diff:.3g})")
    if param_diff > 0 and grad_rel == 0:  # with equal gradients, the optimizer cannot explain any difference
        failures.append(
            f"parameters differ after training although every gradient was equal (max relative "
            f"difference {param_diff:.3g}): the forward or its recompute writes them"
        )
    if loss_diff > grad_tol * max(1.0, abs(first_loss)):
        failures.append(f"losses differ (max difference {loss_diff:.3g})")

    return failures


def _check_arguments(steps, grad_tol, compile) -> None:
    if steps < 1:
        raise MemfitError(f"steps must be at least 1, got {steps}.")
    if grad_tol is not None and not (isinstance(grad_tol, (int, float)) and 0 <= grad_tol < float("inf")):
        raise MemfitError(f"grad_tol {grad_tol} must be a finite number of at least 0, like 1e-4 (0: bitwise).")
    check_backend(compile)


def _default_tolerance(device: torch.device, compile: str | None) -> float:
    """0 (bitwise) for eager CPU steps; compiled with decompositions and a partitioner (or inductor's kernels),
    or on an accelerator, the plain and the checkpointed steps may sum in other orders: 1e-4."""
    return 0.0 if device.type == "cpu" and compile in (None, "eager", "aot_eager") else 1e-4


def _plan_and_units(strategy, model, batch, loss_fn, blocks, device, compile=None):
    """(the plan or None, the units) of a strategy, checked against the model and device; a budget is planned
    for the step compiled with `compile`, if given (NOTE [planning for the compiled step] in
    memfit.planning.planner)."""
    the_plan = resolve_plan(strategy, model, batch, loss_fn, blocks, compile=compile)
    _, units, _ = resolve_units(model, the_plan or strategy, blocks)  # as `wrap` will apply them
    if device.type != "cuda" and any(u.mode == strategies.OFFLOAD for u in units):
        raise MemfitError(
            f"offload moves saved tensors from a CUDA device to CPU memory, so on {device.type} it "
            f"saves nothing; use the cuda device, or a strategy that recomputes."
        )
    return the_plan, units


def _compile_budget_at(model, base, peak, batch, loss_fn, compile, device, blocks, seed) -> dict | None:
    """What torch.compile's own memory budget recomputes at a measured peak no higher than `peak`: each of
    `COMPILE_BUDGETS`, set while a plain copy compiles, measured (peak, FLOPs) like the plan's run; the one that
    recomputes least, or None if none gets that low."""
    runs = {}
    for budget in COMPILE_BUDGETS:
        run = run_of(wrap(copy.deepcopy(model), "none", blocks=blocks), compile, device)
        with torch._functorch.config.patch(activation_memory_budget=budget):
            run.step(batch, loss_fn, seed)  # compiles now, under this budget
        runs[budget] = run
    run_steps(list(runs.values()), batch, loss_fn, seed=seed, timed=0)
    fits = [
        {"budget": b, "peak_bytes": r.mem.peak_bytes, "recompute_flops": r.flops / base.flops - 1}
        for b, r in runs.items()
        if r.mem.peak_bytes <= peak and all(r.graphs_per_step)
    ]
    return min(fits, key=lambda f: f["recompute_flops"], default=None)


def _run_both(base, ckpt, batch, loss_fn, seed, n_steps):
    """The steps of both runs, side by side: (largest relative gradient difference, gradients bitwise equal)."""
    grad_rel, grads_bitwise = 0.0, True

    def compare_grads():
        nonlocal grad_rel, grads_bitwise
        for (name_, p), q in zip(base.model.named_parameters(), ckpt.model.parameters()):
            if (p.grad is None) != (q.grad is None):
                raise MemfitError(f"parameter {name_} got a gradient in one run and not the other.")
            if p.grad is not None:
                grads_bitwise &= torch.equal(p.grad, q.grad)
                grad_rel = max(grad_rel, _max_rel_diff(p.grad, q.grad))

    # step k of both runs, then their gradients compared (see memfit.core.measurement.steps)
    run_steps([base, ckpt], batch, loss_fn, seed=seed, timed=n_steps, after=lambda k: compare_grads())
    return grad_rel, grads_bitwise


@dataclass
class _Comparison:
    """What `verify` was asked, and the two runs it compared side by side."""

    base: Run
    ckpt: Run
    grad_rel: float
    grads_bitwise: bool
    grad_tol: float
    units: list
    the_plan: Plan | None
    name: str
    strategy: object
    device: torch.device
    steps: int
    n_blocks: int
    share: float | None
    state_replay: bool
    compile: str | None
    expect_reduction: tuple | None


def _checkpointed(c: _Comparison) -> dict:
    """The checkpointed run's summary, with a plan's predicted peak, budget and (time cost) slowdown."""
    summary = _summary(c.ckpt)
    if c.the_plan:
        summary.update(predicted_peak_bytes=c.the_plan.predicted_peak_bytes, budget_bytes=c.the_plan.budget_bytes)
        if c.the_plan.cost == "time":  # the time model's slowdown, beside the measured one
            summary["predicted_slowdown"] = c.the_plan.predicted_overhead
    return summary


def _report(c: _Comparison) -> dict:
    """The report of two runs side by side (see `verify`)."""
    loss_diff = max((a - b).abs().item() for a, b in zip(c.base.losses, c.ckpt.losses))
    buffers = list(zip(c.base.model.buffers(), c.ckpt.model.buffers()))
    buffer_diff = max((_max_rel_diff(a.double(), b.double()) for a, b in buffers), default=0.0)
    params = list(zip(c.base.model.parameters(), c.ckpt.model.parameters()))
    param_diff = max((_max_rel_diff(a.detach().double(), b.detach().double()) for a, b in params), default=0.0)
    reduction = 1 - c.ckpt.mem.peak_bytes / c.base.mem.peak_bytes
    slowdown = statistics.median(c.ckpt.times) / statistics.median(c.base.times) - 1
    is_none = all(u.mode == strategies.KEEP for u in c.units)
    failures = _failures(
        reduction,
        is_none,
        c.expect_reduction,
        c.grad_rel,
        buffer_diff,
        param_diff,
        loss_diff,
        c.grad_tol,
        c.base.losses[0].item(),
    )
    if c.compile and any(0 in run.graphs_per_step[1:3] for run in (c.base, c.ckpt)):  # the memory and FLOPs steps
        failures.append("the compiled graph did not run in a measured step, so its numbers are eager code's")
    return {
        "model": c.name,
        "strategy": c.strategy if isinstance(c.strategy, str) else "plan" if c.the_plan else "custom",
        "device": str(c.device),
        "memory_source": c.base.mem.source,
        "torch_version": torch.__version__,
        "steps": c.steps,
        "blocks": {"found": c.n_blocks, "checkpointed": len(wrapped_blocks(c.ckpt.model))},
        "coverage": c.share,
        "state_replay": c.state_replay,
        "compile": c.compile,
        "compiled_graph_runs": {"baseline": c.base.graphs_per_step, "checkpointed": c.ckpt.graphs_per_step}
        if c.compile
        else None,
        "baseline": _summary(c.base),
        "checkpointed": _checkpointed(c),
        "memory_reduction": reduction,
        "slowdown": slowdown,
        "recompute_flops": c.ckpt.flops / c.base.flops - 1 if c.base.flops else 0.0,
        "grads_bitwise_equal": c.grads_bitwise,
        "grads_max_rel_diff": c.grad_rel,
        "grad_tolerance": c.grad_tol,
        "buffers_equal": all(torch.equal(a, b) for a, b in buffers),
        "buffers_max_rel_diff": buffer_diff,
        "losses_equal": loss_diff == 0,
        "loss_max_abs_diff": loss_diff,
        "params_equal": all(torch.equal(p, q) for p, q in params),
        "params_max_rel_diff": param_diff,
        "expect_reduction": list(c.expect_reduction) if c.expect_reduction else None,
        "failures": failures,
        "passed": not failures,
    }


def verify(
    model: torch.nn.Module,
    batch: object,
    loss_fn: Callable,
    strategy: object = "blocks",
    *,
    steps: int = 5,
    device: str | torch.device = "cpu",
    seed: int = 0,
    blocks: object = None,
    expect_reduction: tuple[float, float] | None = None,
    grad_tol: float | None = None,
    state_replay: bool = True,
    name: str | None = None,
    compile: str | None = None,
) -> dict:
    """Train a plain copy of `model` and a checkpointed one side by side; return the report (JSON-ready).

    Args:
        model: the model; it is copied, never trained itself.
        batch: one training batch, as `loss_fn` takes it.
        loss_fn: `loss_fn(model, batch)` returns the loss of a training step.
        strategy: what the checkpointed copy gets: any spelling `memfit.apply` takes (a strategy, a `Plan`,
            `plan:60%`, ...).
        steps: timed steps of each run, after a warm-up step, a memory step and a FLOPs step.
        device: where both runs train.
        seed: the RNG seed of the first step (step k uses seed + k in both runs).
        blocks: the blocks to checkpoint, if not the chains found.
        expect_reduction: (min, max) fraction of the plain peak that must be saved; by default any saving
            (> 0), and for strategy `none` no check.
        grad_tol: the largest relative gradient difference that passes; 0 (bitwise) on CPU, 1e-4 on
            accelerators, whose kernels may not be deterministic even without checkpointing, and under
            compile backends other than `eager` and `aot_eager` (decompositions, the partitioner's
            recomputation, inductor's kernels sum the plain and the checkpointed graph in other orders).
        state_replay: replay module state written in the forward (BatchNorm statistics) in the recompute.
        name: the model's name in the report (default: its class name).
        compile: a `torch.compile` backend ("inductor", "aot_eager", ...): both runs are compiled (the
            warm-up step compiles, outside every measurement), so the report shows the memory checkpointing
            saves under compile. The measured steps run the compiled code (`compiled_graph_runs` counts its
            graphs' runs per step; none in the memory or FLOPs step is a failure); on the CPU inductor's
            memory is read from the allocator's events. With a plan and a backend whose partitioner takes a
            memory budget (`aot_eager_decomp_partition`, `inductor`), `compile_budget_at_this_peak` says what
            torch.compile's own `activation_memory_budget` recomputes at a measured peak no higher than the
            plan's (the least over `COMPILE_BUDGETS`; None if none gets that low).

    Returns:
        The report: both runs' peaks, times and FLOPs, the gradient, loss, buffer and parameter comparisons,
        `failures` (why the checkpointed run is not the same training, or saved nothing) and `passed`.
    """
    _check_arguments(steps, grad_tol, compile)
    device = torch.device(device)
    model = model.to(device).train()
    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    blocks = blocks_of(model, batch, loss_fn, blocks)  # NOTE [blocks called several times] in memfit.core.blocks
    n_blocks = len(find_blocks(model, blocks))
    the_plan, units = _plan_and_units(strategy, model, batch, loss_fn, blocks, device, compile)
    grad_tol = _default_tolerance(device, compile) if grad_tol is None else grad_tol

    # the baseline gets wrap(none): no block is wrapped, but a Hugging Face KV cache is off in both runs
    # (NOTE [no KV cache] in memfit.core.wrapping)
    base, ckpt = (
        run_of(wrap(copy.deepcopy(model), s, blocks=blocks, state_replay=state_replay), compile, device)
        for s in ("none", the_plan or units)
    )
    grad_rel, grads_bitwise = _run_both(base, ckpt, batch, loss_fn, seed, steps)
    share = coverage(model, batch, loss_fn, blocks=blocks)
    if (warning := coverage_warning(share)) is not None:
        warnings.warn(f"memfit: {warning}.", CoverageWarning, stacklevel=2)
    report = _report(
        _Comparison(
            base,
            ckpt,
            grad_rel=grad_rel,
            grads_bitwise=grads_bitwise,
            grad_tol=grad_tol,
            units=units,
            the_plan=the_plan,
            name=name or type(model).__name__,
            strategy=strategy,
            device=device,
            steps=steps,
            n_blocks=n_blocks,
            share=share,
            state_replay=state_replay,
            compile=compile,
            expect_reduction=expect_reduction,
        )
    )
    if the_plan is not None and compile in PARTITIONED:  # the plan against compile's own budget, at its peak
        report["compile_budget_at_this_peak"] = _compile_budget_at(
            model, base, ckpt.mem.peak_bytes, batch, loss_fn, compile, device, blocks, seed
        )
    return report
