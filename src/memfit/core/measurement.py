"""Real training steps, measured: the one loop behind `verify`, `measure`,
`fit`, `bench` and the profiler's timings.

A `Run` is a model with an optimizer (or none: forward and backward only).
`steps` drives one or more runs through the same protocol, side by side:

1. a warm-up step (it creates the optimizer state, and compiles a compiled
   model), unmeasured;
2. with `memory`, a step measured by `memfit.track_memory` (on CUDA, what
   else the device held at entry is taken out);
3. with `flops`, a step under the FLOP counter (it holds tensors, so never
   the memory step);
4. `timed` timed steps, the runs alternating which goes first.

Every step of every run starts from `torch.manual_seed(seed + k)`, so the
runs see the same dropout masks, and `after(k)` is called once all runs
have made step k (verify compares gradients there).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from memfit.core.flops import counting_flops
from memfit.core.memory import MemoryTracker, static_tensors, storage_bytes, track_memory
from memfit.core.wrapping import wrap
from memfit.errors import MemfitError, scalar_loss

__all__ = ["Run", "steps", "measure", "compiled", "run_of", "resolve_device"]


@dataclass
class Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer | None  # None: forward and backward only, the gradients freed before each
    forward: torch.nn.Module | None = None  # what the loss calls: the model, or the model compiled
    allocator_events: bool = False  # measure memory by the CPU allocator's events (inductor's compiled code)
    graph_calls: list | None = None  # counts the compiled graphs' runs, for a forward made by `compiled`
    graphs_per_step: list = field(default_factory=list)  # how many compiled graphs ran in each step
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    mem: MemoryTracker = field(default_factory=lambda: MemoryTracker("not measured yet", "none"))  # `steps` sets it
    flops: int = 0

    def step(self, batch, loss_fn, seed, measure=None):
        """One training step; `measure()` (a context manager) wraps forward,
        backward and optimizer step, after the previous gradients are freed."""
        before = len(self.graph_calls) if self.graph_calls is not None else 0
        torch.manual_seed(seed)  # the same dropout masks for every run
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        else:
            for p in self.model.parameters():
                p.grad = None
        with (measure or contextlib.nullcontext)() as result:
            loss = scalar_loss(loss_fn, self.model if self.forward is None else self.forward, batch)
            loss.backward()
            if self.opt is not None:
                self.opt.step()
        self.losses.append(loss.detach())
        if self.graph_calls is not None:
            self.graphs_per_step.append(len(self.graph_calls) - before)
        return result


def _device(run: Run) -> torch.device:
    return next(run.model.parameters()).device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(runs, batch, loss_fn, *, seed=0, memory=True, flops=True, timed=2, after=None) -> None:
    """The protocol above; results land on each run (`mem`, `flops`, `times`, `losses`)."""

    def warm_up(run, device, k):
        run.step(batch, loss_fn, k)

    def measure_memory(run, device, k):
        tracked = functools.partial(
            track_memory, run.model, run.opt, batch, device=device, allocator_events=run.allocator_events
        )
        run.mem = run.step(batch, loss_fn, k, tracked)
        if device.type == "cuda":
            _only_own(run.mem, run, batch)

    def count_flops(run, device, k):
        run.flops = run.step(batch, loss_fn, k, counting_flops).get_total_flops()

    def time_step(run, device, k):
        t0 = time.perf_counter()
        run.step(batch, loss_fn, k)
        _sync(device)
        run.times.append(time.perf_counter() - t0)

    rounds = (
        [(warm_up, runs)]
        + [(measure_memory, runs)] * memory
        + [(count_flops, runs)] * flops
        + [(time_step, runs if i % 2 == 0 else runs[::-1]) for i in range(timed)]
    )
    for k, (step_of, order) in enumerate(rounds, start=seed):  # step k of each run, then `after(k)`
        for run in order:
            device = _device(run)
            _sync(device)
            step_of(run, device, k)
        if after is not None:
            after(k)


def compiled(model, backend: str):
    """`model` compiled with `backend`, and a list that grows by one each
    time one of its compiled graphs runs: a step that runs none ran eagerly."""
    inner, calls = torch._dynamo.lookup_backend(backend), []

    def counting(gm, example_inputs):
        graph = inner(gm, example_inputs)

        def run(*args):
            calls.append(1)
            return graph(*args)

        run._boxed_call = getattr(graph, "_boxed_call", False)  # called with a list of inputs, if it is
        return run

    return torch.compile(model, backend=counting), calls


# The torch.compile backends whose code calls aten ops, which the storage tracker sees (NOTE [compiled code]).
SEEN_BY_THE_TRACKER = ("eager", "aot_eager", "aot_eager_decomp_partition", "aot_eager_default_partitioner")


def check_backend(compile) -> None:
    """A MemfitError unless `compile` is None or a torch.compile backend's name."""
    if compile and compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise MemfitError(
            f"unknown torch.compile backend {compile!r}; use inductor (the default), aot_eager, "
            f"or another name torch._dynamo.list_backends() gives."
        )


def run_of(model, compile, device, optimizer=None) -> Run:
    """A run of `model` (AdamW, or `optimizer`'s class), compiled with the backend `compile` if given. NOTE
    [compiled code] in memfit.core.memory: the storage tracker sees what the aot_eager backends' code allocates, not
    inductor's CPU kernels' buffers, which the allocator's events show."""
    opt = (optimizer or torch.optim.AdamW)(model.parameters(), lr=1e-3)
    if not compile:
        return Run(model, opt)
    forward, calls = compiled(model, compile)
    return Run(
        model,
        opt,
        forward=forward,
        graph_calls=calls,
        allocator_events=torch.device(device).type == "cpu" and compile not in SEEN_BY_THE_TRACKER,
    )


def compiled_step(model, batch, loss_fn, strategy, backend, *, blocks=None, optimizer=None) -> tuple[int, int]:
    """(peak bytes, FLOPs) of a steady-state step of a copy of `model` with
    `strategy` applied, compiled with `backend` (its first step compiles,
    outside the measurement)."""
    m = wrap(copy.deepcopy(model).train(), strategy, blocks=blocks)
    run = run_of(m, backend, next(m.parameters()).device, optimizer)
    # each copy compiles anew (its guards are on its own parameters): past dynamo's recompile limit, it would run
    # eagerly
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit + 1000):
        steps([run], batch, loss_fn, timed=0)
    if not all(run.graphs_per_step):
        raise MemfitError(
            f"the model compiled with {backend} ran no compiled graph in a step, so its compiled peak "
            f"cannot be measured; plan without compile."
        )
    return run.mem.peak_bytes, run.flops


def measure(
    model,
    batch,
    loss_fn,
    strategy,
    *,
    blocks=None,
    optimizer=None,
    timed_steps=2,
    memory=True,
    flops=True,
    against=None,
) -> dict:
    """One strategy on a copy of `model`, as verify measures it: `peak_bytes`
    of a steady-state step, `step_time_s` (the median of `timed_steps`, None
    for 0), and `flops` of a step (each None when not measured). `against`:
    another strategy measured side by side (its steps interleaved), and the
    `slowdown` and `recompute_flops` (extra FLOPs) against it."""
    runs = []
    for s in (strategy, against) if against is not None else (strategy,):
        m = wrap(copy.deepcopy(model).train(), s, blocks=blocks)
        runs.append(Run(m, (optimizer or torch.optim.AdamW)(m.parameters())))
    steps(runs, batch, loss_fn, memory=memory, flops=flops, timed=timed_steps)
    run, mem = runs[0], runs[0].mem
    out = {
        "peak_bytes": mem and mem.peak_bytes,
        "activation_bytes": mem and mem.activation_bytes,
        "memory_source": mem and mem.source,
        "step_time_s": statistics.median(run.times) if run.times else None,
        "flops": run.flops if flops else None,
    }
    if against is not None:
        base = runs[1]
        out["slowdown"] = statistics.median(run.times) / statistics.median(base.times) - 1 if run.times else None
        out["recompute_flops"] = run.flops / base.flops - 1 if flops else None
    return out


def _only_own(mem, run: Run, batch) -> None:
    """Take out of a CUDA measurement what else the device held at entry (the
    other run, the caller's model, ...): the allocator counts it all. The run's
    own static bytes are its parameters, buffers, optimizer state and batch;
    its gradients were freed before the step."""
    held = mem.static_bytes - storage_bytes(
        static_tensors(list(run.model.parameters()), list(run.model.buffers()), run.opt, batch)
    )
    mem.peak_bytes -= held
    mem.static_bytes -= held
    if mem.forward_end_bytes is not None:
        mem.forward_end_bytes -= held


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" is the accelerator if there is one, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device not in available:
        raise MemfitError(f"unknown device {device!r}; use auto, cpu, cuda or mps.")
    if not available[device]:
        raise MemfitError(f"device {device!r} is not available on this machine; use 'auto' or 'cpu'.")
    return torch.device(device)
