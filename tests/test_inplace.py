"""Blocks that write in place a tensor a policy saves (NOTE [in-place writes to
saved tensors] in memfit.core.pruning): every op-level mode gives the plain step's
gradients bitwise, recomputes, and the simulated step prices the copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.core import ondemand
from memfit.core.measurement import measure
from memfit.core.strategies import Mode, Unit
from memfit.planning.simulation import simulate

PATTERNS = ["relu_", "silu_", "add_", "mul_", "norm_", "view_", "linear_relu_"]
MODES = ["selective", "scores", "pointwise", "ops:convolution@0", "lazy:convolution@0"]


class InPlaceBlock(nn.Module):
    """A convolution whose output the block then writes in place, as `pattern` says."""

    def __init__(self, pattern, c=4):
        super().__init__()
        self.pattern, self.calls = pattern, 0
        self.conv, self.out = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.linear, self.scale = nn.Linear(5, 5), nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        self.calls += 1
        y = self.conv(x)  # saved by every mode in MODES
        if self.pattern == "relu_":
            F.relu(y, inplace=True)
        elif self.pattern == "silu_":  # timm's and torchvision's nn.SiLU(inplace=True)
            y = F.silu(y, inplace=True)
        elif self.pattern == "add_":  # `out += identity`
            y.add_(x)
        elif self.pattern == "mul_":
            y.mul_(self.scale)
        elif self.pattern == "norm_":  # in-place normalisation
            y.sub_(y.mean(dim=1, keepdim=True)).mul_(self.scale)
        elif self.pattern == "view_":  # an in-place op on a view of the saved tensor
            y[:, :2].mul_(self.scale)
        elif self.pattern == "linear_relu_":  # a linear layer's saved output, then relu_
            z = self.linear(y)
            z.relu_()
            y = y + z
        return x + self.out(torch.tanh(y))


class InPlaceNet(nn.Module):
    def __init__(self, pattern, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList([InPlaceBlock(pattern) for _ in range(depth)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def loss_fn(model, batch):
    return model(batch).square().mean()


def _units(mode, n=3):
    return mode if ":" not in mode else [Unit(i, i + 1, Mode.parse(mode)) for i in range(n)]


def _step(model, batch):
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_mode_is_exact_on_blocks_that_write_a_saved_tensor_in_place(pattern, mode, monkeypatch):
    replays = []
    evaluate = ondemand._evaluate
    monkeypatch.setattr(ondemand, "_evaluate", lambda ref: (replays.append(ref.node.value is None), evaluate(ref))[1])
    torch.manual_seed(0)
    plain, batch = InPlaceNet(pattern), torch.randn(2, 4, 5, 5)
    wrapped = memfit.apply(copy.deepcopy(plain), _units(mode))
    for _ in range(2):
        (loss_a, grads_a), (loss_b, grads_b) = _step(plain, batch), _step(wrapped, batch)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) >= 9
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    on_demand = mode.startswith("lazy:")  # replays single ops in backward, never the block's forward
    assert [b.calls for b in wrapped.blocks] == [2, 2, 2] if on_demand else [4, 4, 4]
    assert sum(replays) >= 6 if on_demand else not replays


@pytest.mark.parametrize("pattern", ["relu_", "add_", "view_"])
@pytest.mark.parametrize("mode", ["selective", "ops:convolution@0"])
def test_the_simulated_step_prices_the_copy_of_a_tensor_written_in_place(pattern, mode):
    """The copy is made under the memory tracker and fake tensors, so a
    simulated step equals the measured one to the byte, and both keep the
    copy's bytes until backward, as the saved output would have."""
    torch.manual_seed(0)
    model, batch = InPlaceNet(pattern), torch.randn(2, 4, 5, 5)
    measured = measure(model, batch, loss_fn, _units(mode), timed_steps=0)["peak_bytes"]
    assert simulate(model, batch, loss_fn, _units(mode)).peak_bytes == measured
    recompute = measure(model, batch, loss_fn, "blocks", timed_steps=0)["peak_bytes"]
    assert measured > recompute  # the saved convolution outputs (copies) are kept


def test_a_plan_on_in_place_blocks_fits_and_predicts_the_peak():
    torch.manual_seed(0)
    model, batch = InPlaceNet("silu_", depth=4), torch.randn(4, 4, 5, 5)
    p = memfit.plan(model, batch, loss_fn, "85%", cost="flops")
    report = memfit.verify(model, batch, loss_fn, p, steps=1)
    assert report["passed"] and report["grads_bitwise_equal"]
    assert report["checkpointed"]["peak_bytes"] == p.predicted_peak_bytes <= p.budget_bytes
