"""A 4-layer MLP: an input layer and 4 hidden layers of the same
width, each Linear -> ReLU -> Dropout, then a classifier.

Its parameters and their gradients are a large part of its peak, so
checkpointing saves less here than on deep nets: that is the point of showing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {  # (input features, hidden width, classes)
    "tiny": (32, 64, 10),
    "small": (512, 512, 10),
    "large": (4096, 8192, 1000),
}


def layer(n_in, n_out, dropout):
    return nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(dropout))


class MLP(nn.Module):
    def __init__(self, n_in=512, hidden=1024, n_out=10, n_hidden=4, dropout=0.1):
        super().__init__()
        self.input = layer(n_in, hidden, dropout)  # (B, n_in) -> (B, hidden)
        self.hidden = nn.ModuleList([layer(hidden, hidden, dropout) for _ in range(n_hidden)])
        self.head = nn.Linear(hidden, n_out)  # (B, hidden) -> (B, n_out)

    def forward(self, x):
        x = self.input(x)
        for block in self.hidden:
            x = block(x)
        return self.head(x)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def create_mlp(cfg: dict, gradient_checkpointing=False) -> MLP:
    """MLP(**cfg) (n_in, hidden, n_out, n_hidden, dropout) with `gradient_checkpointing` applied."""
    from memfit.models.switch import checkpointing

    return checkpointing(MLP(**cfg), gradient_checkpointing)


def batch(size="small", batch_size=1024, seed=0):
    """Points around one random centre per class, and their classes."""
    n_in, _, n_out = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(12345))
    y = torch.randint(n_out, (batch_size,), generator=g)
    return centres[y] + torch.randn(batch_size, n_in, generator=g), y


def build(size="small", batch_size=1024, seed=0, gradient_checkpointing=False):
    n_in, hidden, n_out = SIZES[size]
    torch.manual_seed(seed)
    model = create_mlp(dict(n_in=n_in, hidden=hidden, n_out=n_out), gradient_checkpointing)
    return model, batch(size, batch_size, seed + 1), loss_fn
