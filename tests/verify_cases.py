"""Models on which checkpointing cannot be the same training, for `verify` to fail on
(`test_verification.py`; the CLI imports them as `--model verify_cases:NAME` from this folder)."""

import torch
from torch import nn


class PrivateDropout(nn.Module):
    """Dropout drawn from a generator of its own, which no checkpoint replays: the recompute draws another mask."""

    def __init__(self):
        super().__init__()
        self.linear, self.generator = nn.Linear(16, 16), torch.Generator().manual_seed(0)

    def forward(self, x):
        keep = torch.rand(x.shape, generator=self.generator) > 0.5
        return torch.tanh(self.linear(x)) * keep * 2


class CountingShift(nn.Module):
    """Counts its calls, which the loss adds, a constant without gradient: a recompute shifts the next step's loss
    only."""

    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(16, 16), 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.linear(x))


class Drifting(nn.Module):
    """Writes a parameter in its forward: recomputed, it writes it twice."""

    def __init__(self):
        super().__init__()
        self.linear, self.drift = nn.Linear(16, 16), nn.Parameter(torch.zeros(16), requires_grad=False)

    def forward(self, x):
        with torch.no_grad():
            self.drift.add_(1.0)
        return torch.tanh(self.linear(x))


class Wide(nn.Module):
    """A block whose parameters dwarf what its forward keeps: recomputing it saves nothing."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        return self.linear(x)


def _make(block, loss, rows=256):
    def factory(batch_size=rows):
        torch.manual_seed(0)
        return nn.Sequential(*[block() for _ in range(3)]), torch.randn(batch_size, 16), loss

    return factory


wrong_gradients = _make(PrivateDropout, lambda m, x: m(x).square().mean())
wrong_losses = _make(CountingShift, lambda m, x: m(x).square().mean() + sum(b.calls for b in m))
drifting_parameters = _make(Drifting, lambda m, x: m(x).square().mean())
no_saving = _make(Wide, lambda m, x: m(x).square().mean(), rows=4)
