"""memfit.profiling: simulated steps against real ones, and profiling that leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import models
from memfit.measurement import measure
from memfit.profiling import simulate
from memfit.strategies import Unit


@pytest.mark.parametrize("name", ["gpt", "resnet-se"])
def test_a_simulated_step_peaks_where_the_real_one_does(name):
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=4)
    for strategy in ("none", "blocks", "selective", "sqrt"):
        assert simulate(model, batch, loss_fn, strategy).peak_bytes == \
            measure(model, batch, loss_fn, strategy, timed_steps=0, flops=False)["peak_bytes"], strategy


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


@pytest.mark.parametrize("name, real", [("gpt", False), ("resnet-se", False), ("hf:llama", True)])
def test_the_ops_recorded_are_the_ones_a_policy_numbers(name, real, monkeypatch):
    """NOTE [op-level modes]: `ops:K` names the K-th op the selective-checkpoint
    mode shows the policy; the profile's record of each block must count the
    same ops in the same order (BatchNorm's buffers included: memfit's state
    snapshot must not show the policy its copies). transformers' Llama takes
    another path on fake tensors (NOTE [real steps]): its real step is recorded."""
    from memfit import strategies
    from memfit.profiling import record_ops
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=4)
    recorded = record_ops(model, batch, loss_fn, real=real, seed=0).blocks
    seen, draws = [], strategies.draws_random

    def spy(op, args, kwargs):
        seen.append(strategies.op_name(op))
        return draws(op, args, kwargs)
    monkeypatch.setattr(strategies, "draws_random", spy)
    n = len(memfit.find_blocks(model))
    memfit.apply(model, [Unit(i, i + 1, "ops:mm@0") for i in range(n)])
    loss_fn(model, batch).backward()
    assert seen == [op.name for ops in recorded for op in ops]
