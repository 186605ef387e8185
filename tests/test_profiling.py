"""memfit.profiling: simulated steps against real ones, and profiling that leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import models
from memfit.measurement import measure
from memfit.profiling import simulate, time_strategies
from memfit.wrapping import applied_strategy


@pytest.mark.parametrize("name", ["gpt", "resnet-se"])
def test_a_simulated_step_peaks_where_the_real_one_does(name):
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=4)
    for strategy in ("none", "blocks", "selective", "sqrt"):
        assert simulate(model, batch, loss_fn, strategy).peak_bytes == \
            measure(model, batch, loss_fn, strategy, timed_steps=0, flops=False)["peak_bytes"], strategy


def test_timing_the_strategies_leaves_no_trace():
    """Gradients, BatchNorm statistics, the RNG and the strategy applied are as they were."""
    model, batch, loss_fn = models.load("resnet-se", size="tiny", batch_size=4)
    memfit.apply(model, "every:2")
    loss_fn(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    applied, rng = applied_strategy(model), torch.get_rng_state()
    times = time_strategies(model, batch, loss_fn)
    assert set(times) == {"keep", "recompute", "selective", "scores", "pointwise"} and min(times.values()) > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert applied_strategy(model) == applied and torch.equal(torch.get_rng_state(), rng)


class Tower(nn.Module):
    def __init__(self, n=4, width=32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class Distill(nn.Module):
    """A student trained against a frozen teacher run under no_grad (EMA targets, distillation): the teacher's
    blocks are found as a chain, but have no backward."""

    def __init__(self):
        super().__init__()
        self.student = Tower()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
        return nn.functional.mse_loss(self.student(x), target)


def test_blocks_without_a_backward_are_planned_and_predicted_exactly():
    torch.manual_seed(0)
    model, batch = Distill(), torch.randn(512, 32)
    loss_fn = lambda m, b: m(b)  # noqa: E731
    assert len(memfit.find_blocks(model)) == 8
    for budget in ("80%", "60%"):
        p = memfit.plan(model, batch, loss_fn, budget, cost="flops")
        assert {b.mode for b in p.blocks if b.name.startswith("teacher")} == {"keep"}
        assert [b.name for b in p.blocks] == [n for n, _ in memfit.find_blocks(model)]
        assert measure(model, batch, loss_fn, p, timed_steps=0, flops=False)["peak_bytes"] == p.predicted_peak_bytes
