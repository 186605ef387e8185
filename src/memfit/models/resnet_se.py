"""A residual conv net: residual blocks with BatchNorm and
squeeze-excitation on a 15x15 board, with policy and value heads (a Gomoku net).

Shapes: B batch, c channels, 15x15 board; input planes: own stones, opponent's
stones, side to move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BOARD = 15
SIZES = {  # (blocks, channels)
    "tiny": (3, 16),
    "small": (10, 48),
    "full": (30, 192),
}


class SqueezeExcite(nn.Module):
    def __init__(self, c, reduction=4):
        super().__init__()
        self.fc1 = nn.Linear(c, c // reduction)
        self.fc2 = nn.Linear(c // reduction, c)

    def forward(self, x):  # (B, c, H, W)
        s = x.mean(dim=(2, 3))  # (B, c)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class ResidualBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> SE -> + input -> ReLU"""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return F.relu(x + y)


class ResNetSE(nn.Module):
    def __init__(self, n_blocks=30, channels=192, planes=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(planes, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(n_blocks)])
        self.policy = nn.Sequential(
            nn.Conv2d(channels, 2, 1, bias=False),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * BOARD * BOARD, BOARD * BOARD),
        )
        self.value = nn.Sequential(
            nn.Conv2d(channels, 1, 1, bias=False),
            nn.BatchNorm2d(1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(BOARD * BOARD, 64),
            nn.ReLU(),
            nn.Linear(64, 1),
            nn.Tanh(),
        )

    def forward(self, x):  # (B, planes, 15, 15)
        x = self.blocks(self.stem(x))  # (B, c, 15, 15)
        return self.policy(x), self.value(x).squeeze(1)  # (B, 225), (B,)


def loss_fn(model, batch):
    boards, moves, outcomes = batch
    logits, value = model(boards)
    return F.cross_entropy(logits, moves) + F.mse_loss(value, outcomes)


def batch(size="small", batch_size=32, seed=0):
    """Random positions with learnable targets: the move is the empty point with
    the most own stones around it, the outcome the sign of the stone balance."""
    g = torch.Generator().manual_seed(seed)
    stones = torch.randint(3, (batch_size, BOARD, BOARD), generator=g)
    side = torch.randint(2, (batch_size, 1, 1), generator=g).float().expand(-1, BOARD, BOARD)
    own, other = (stones == 1).float(), (stones == 2).float()
    boards = torch.stack([own, other, side], dim=1)
    around = F.conv2d(own[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0]
    moves = (around - 10 * (stones != 0).float()).flatten(1).argmax(1)
    outcomes = torch.sign(own.sum((1, 2)) - other.sum((1, 2)))
    return boards, moves, outcomes


def create_resnet_se(cfg: dict, gradient_checkpointing=False) -> ResNetSE:
    """ResNetSE(**cfg) (n_blocks, channels, planes) with `gradient_checkpointing`
    applied: `use_checkpoint=True` is gradient_checkpointing=True."""
    from memfit.models.switch import checkpointing

    return checkpointing(ResNetSE(**cfg), gradient_checkpointing)


def build(size="small", batch_size=32, seed=0, gradient_checkpointing=False):
    n_blocks, channels = SIZES[size]
    torch.manual_seed(seed)
    return (
        create_resnet_se(dict(n_blocks=n_blocks, channels=channels), gradient_checkpointing),
        batch(size, batch_size, seed + 1),
        loss_fn,
    )
