"""How long an op takes on a device, from its FLOPs and the bytes it moves.

    model = calibrate("cpu")
    model.seconds(flops=2 * 512**3, moved=3 * 512**2 * 4)   # one 512 x 512 matmul

NOTE [time model]
Recomputing an op in eager mode costs its FLOPs (matmuls, convolutions,
attention), the bytes it reads and writes (norms, activations, dropout: no
FLOPs to speak of, all memory traffic) and a fixed cost per op (dispatch; on
a tiny model on a CPU it is most of the time). So an op takes

    seconds = per_flop * FLOPs + per_byte * bytes moved + per_op

with the three coefficients fitted, on the device in use, from ops of known
FLOPs and bytes: matmuls of four sizes, an elementwise product at four sizes
and a view, on inputs that require grad (a recompute runs its ops with
autograd recording them). Each is timed `repeats` times in rounds, the ops
interleaved within a round, so that a burst of load on a busy machine falls
on all of them alike; the fit uses each op's fastest time (load only ever
adds time), by least squares on the relative error with no negative
coefficient. `spread`, the median over the ops of
(upper quartile - lower quartile) / median, says how noisy the machine was
while calibrating; `error`, the median relative error of the fit, how well
three numbers describe the device. The coefficients are rounded to two
significant digits; on a busy machine they still move from run to run (their
spread says how much), and a plan with them.
A selective checkpoint (the presets, op-level modes) also costs its dispatch
modes' Python on every op of the block, in the forward and in the recompute:
`per_policy_op`, timed on a chain of small ops checkpointed with and without
a policy. On a tiny model on a CPU it is most of what such a mode costs; on a
GPU, whose kernels run asynchronously, it may hide behind them (not measured:
no GPU has been lent to this project).

memfit used to split the measured extra time of a few whole steps between the
blocks instead; on a loaded machine those steps were noise (a plan at 60% of
the peak recomputing 4x the FLOPs of a uniform strategy that fit).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["TimeModel", "calibrate"]


@dataclass(frozen=True)
class TimeModel:
    device: str
    per_flop: float
    per_byte: float
    per_op: float
    spread: float  # median interquartile range / median of the timed ops
    error: float  # median |fit / measured - 1| over the timed ops
    per_offloaded_byte: float | None = None  # a byte to the host and back (CUDA only)
    per_policy_op: float = 0.0  # what a selective-checkpoint policy adds to each op of its block

    def seconds(self, flops=0, moved=0, ops=1) -> float:
        return self.per_flop * flops + self.per_byte * moved + self.per_op * ops


_CACHE: dict = {}


def calibrate(device="cpu", repeats=7) -> TimeModel:
    """The time model of `device`, fitted once per process and device."""
    device = torch.device(device)
    key = (str(device), repeats)
    if key not in _CACHE:
        _CACHE[key] = _fit(device, repeats)
    return _CACHE[key]


def _probes(device):
    """(name, function, FLOPs, bytes moved) of each op timed, on constant tensors: calibrating draws no random
    numbers, so it leaves the training's RNG as it was."""
    out = []
    for n in (32, 96, 192, 384):
        a, b = _leaf((n, n), 0.5, device), _leaf((n, n), 2.0, device)
        out.append((f"mm {n}", lambda a=a, b=b: torch.mm(a, b), 2 * n**3, 3 * n * n * 4))
    for n in (2**10, 2**14, 2**18, 2**21):
        a, b = _leaf((n,), 0.5, device), _leaf((n,), 2.0, device)
        out.append((f"mul {n}", lambda a=a, b=b: torch.mul(a, b), 0, 3 * n * 4))
    a = _leaf((64, 64), 0.0, device)
    out.append(("view", lambda a=a: a.view(-1), 0, 0))
    return out


def _leaf(shape, value, device):
    """A constant tensor that requires grad: a recompute runs its ops with autograd recording them, so do the probes."""
    return torch.full(shape, value, device=device, requires_grad=True)


def _time(fn, sync, calls) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def _fit(device, repeats) -> TimeModel:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probes = _probes(device)
    calls = [max(1, min(200, int(4e-3 / max(_time(fn, sync, 3), 1e-7)))) for _, fn, _, _ in probes]  # ~4 ms a time
    times: list[list[float]] = [[] for _ in probes]
    for _ in range(repeats):
        for k, (_, fn, _, _) in enumerate(probes):
            times[k].append(_time(fn, sync, calls[k]))
    medians, fastest = [statistics.median(t) for t in times], [min(t) for t in times]
    spread = statistics.median(
        (q[2] - q[0]) / m for q, m in ((statistics.quantiles(t, n=4), m) for t, m in zip(times, medians))
    )
    x = torch.tensor([[f, b, 1.0] for _, _, f, b in probes], dtype=torch.float64)
    y = torch.tensor(fastest, dtype=torch.float64)
    coef = _nonnegative_fit(x / y[:, None], torch.ones_like(y))  # relative error: each row divided by its time
    coef = [float(f"{c:.2g}") for c in coef.tolist()]
    fitted = x @ torch.tensor(coef, dtype=torch.float64)
    error = statistics.median((fitted / y - 1).abs().tolist())
    per_flop, per_byte, per_op = coef
    return TimeModel(
        str(device),
        per_flop,
        per_byte,
        per_op,
        spread=spread,
        error=error,
        per_offloaded_byte=_offload_seconds_per_byte(device, sync) if device.type == "cuda" else None,
        per_policy_op=float(f"{_policy_seconds_per_op(device, sync, repeats):.2g}"),
    )


def _nonnegative_fit(a, b):
    """Least squares a @ c = b with c >= 0: columns whose coefficient comes out negative are dropped and the rest
    refitted (enough for three columns that each describe a cost)."""
    cols = list(range(a.shape[1]))
    while True:
        c = torch.linalg.lstsq(a[:, cols], b[:, None]).solution[:, 0]
        if (c >= 0).all() or len(cols) == 1:
            out = torch.zeros(a.shape[1], dtype=a.dtype)
            out[cols] = c.clamp(min=0)
            return out
        cols.pop(int(torch.argmin(c)))


def _policy_seconds_per_op(device, sync, repeats) -> float:
    """What a selective-checkpoint policy adds to each op of a checkpointed
    call (its dispatch modes see every op, in the forward and again in the
    recompute): a chain of small ops, checkpointed with and without one."""
    from memfit.core import strategies
    from memfit.core.checkpointing import run

    x, n = _leaf((64,), 1.0, device), 32

    def chain(x):
        for _ in range(n):
            x = x * 1.0001
        return x.sum()

    policy = strategies.policy(strategies.Mode.parse("ops:mul.Tensor@0"))
    timed = {
        "plain": lambda: run(chain, (x,), {}).backward(),
        "policy": lambda: run(chain, (x,), {}, policy=policy).backward(),
    }
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(repeats):
        for k, fn in timed.items():
            times[k].append(_time(fn, sync, 5))
    return max(min(times["policy"]) - min(times["plain"]), 0.0) / (n + 1)


def _offload_seconds_per_byte(device, sync) -> float:
    """A byte copied to pinned host memory and back (`save_on_cpu`'s path)."""
    x = torch.empty(2**24, device=device)
    host = torch.empty(x.shape, pin_memory=True)
    t = statistics.median(
        _time(lambda: (host.copy_(x, non_blocking=True), x.copy_(host, non_blocking=True)), sync, 5) for _ in range(5)
    )
    return t / x.nbytes
