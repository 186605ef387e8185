"""memfit.core.measurement: the one loop of real, measured training steps."""

import copy

import pytest
import torch
from torch import nn

from memfit import MemfitError, models
from memfit.core.measurement import Run, measure, resolve_device, steps
from memfit.core.memory import track_memory
from memfit.core.wrapping import wrap


def runs_of(model, n=2, strategies=("none", "blocks")):
    out = []
    for s in strategies[:n]:
        m = wrap(copy.deepcopy(model), s)
        out.append(Run(m, torch.optim.AdamW(m.parameters())))
    return out


def test_the_runs_step_side_by_side_on_the_same_random_numbers():
    """The mlp has dropout: the plain and the checkpointed run agree step by step only if each step of each
    run starts from the same seed."""
    model, batch, loss_fn = models.load("mlp", size="tiny", batch_size=8)
    base, ckpt = runs_of(model)
    seen = []
    steps(
        [base, ckpt],
        batch,
        loss_fn,
        seed=5,
        timed=3,
        after=lambda k: seen.append(
            (k, all(torch.equal(p.grad, q.grad) for p, q in zip(base.model.parameters(), ckpt.model.parameters())))
        ),
    )
    assert seen == [(k, True) for k in range(5, 11)]  # warm-up, memory, FLOPs, 3 timed
    assert len(base.losses) == len(ckpt.losses) == 6 and all(
        torch.equal(a, b) for a, b in zip(base.losses, ckpt.losses)
    )
    assert len(base.times) == len(ckpt.times) == 3 and base.flops > 0 and ckpt.flops > base.flops


def test_the_memory_step_is_the_trackers_steady_state_step():
    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=4)
    got = measure(model, batch, loss_fn, "blocks", timed_steps=0, flops=False)
    m = wrap(copy.deepcopy(model), "blocks")
    opt = torch.optim.AdamW(m.parameters())
    for seed in (0, 1):  # a warm-up step creates the optimizer state
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        with track_memory(m, opt, batch) as mem:
            loss_fn(m, batch).backward()
            opt.step()
    assert got["peak_bytes"] == mem.peak_bytes and got["flops"] is None and got["step_time_s"] is None


def test_a_run_without_optimizer_times_forward_and_backward_and_runs_alternate():
    model, batch, loss_fn = models.load("mlp", size="tiny", batch_size=8)
    order, runs = [], []
    for s in ("none", "blocks"):
        m = wrap(copy.deepcopy(model), s)
        m.register_forward_pre_hook(lambda module, args, s=s: order.append(s))
        runs.append(Run(m, None))
    before = [p.detach().clone() for p in model.parameters()]
    steps(runs, batch, loss_fn, memory=False, flops=False, timed=2)
    assert order == ["none", "blocks", "none", "blocks", "blocks", "none"]  # the second timed round reversed
    assert all(torch.equal(p, q) for r in runs for p, q in zip(r.model.parameters(), before))  # no optimizer: no update
    assert all(len(r.times) == 2 and min(r.times) > 0 for r in runs)


def test_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")

    def available(kind):
        return {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}[kind]()

    assert resolve_device("auto").type == next((k for k in ("cuda", "mps") if available(k)), "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"  # no CUDA: the other accelerator before the CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(MemfitError, match="unknown device 'tpu'; use auto, cpu, cuda or mps"):
        resolve_device("tpu")
    with pytest.raises(MemfitError, match="not available on this machine"):
        resolve_device("cuda")  # CUDA is patched away above


def test_a_loss_that_is_not_a_scalar_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(MemfitError):
        steps([Run(model, None)], torch.randn(4, 3), lambda m, b: m(b), memory=False, flops=False, timed=0)
