"""A video classifier: a per-frame conv encoder, a temporal
transformer over the frames, and a classification head; plus synthetic clips
of objects moving with one motion pattern per class.

Shapes: B clips, T frames (31), C channels, H x W frame, D feature width.
Two chains of blocks: `frames.blocks` (spatial) and `temporal.blocks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.models.vit_jepa import Block

MOTIONS = ("slow", "fast", "oscillating", "darting")


@dataclass
class VideoConfig:
    frames: int = 31
    channels: int = 3
    size: int = 32
    width: int = 32  # conv channels
    spatial_blocks: int = 4
    dim: int = 64  # temporal transformer width
    temporal_blocks: int = 4
    heads: int = 4
    classes: int = len(MOTIONS)


SIZES = {
    "tiny": VideoConfig(frames=8, size=16, width=8, spatial_blocks=2, dim=16, temporal_blocks=2, heads=2),
    "small": VideoConfig(),
    "large": VideoConfig(size=64, width=64, spatial_blocks=8, dim=256, temporal_blocks=8, heads=8),
}


class ConvBlock(nn.Module):
    """Residual conv -> BN -> ReLU -> conv -> BN -> + input -> ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class FrameEncoder(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.channels, cfg.width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cfg.width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ConvBlock(cfg.width) for _ in range(cfg.spatial_blocks)])
        self.out = nn.Linear(cfg.width * 16, cfg.dim)

    def forward(self, frames):  # (N, C, H, W)
        x = self.blocks(self.stem(frames))  # (N, width, H/2, W/2)
        return self.out(F.adaptive_avg_pool2d(x, 4).flatten(1))  # (N, D): keeps where things are


class TemporalTransformer(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, cfg.frames + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads) for _ in range(cfg.temporal_blocks)])
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x):  # (B, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # (B, D)


class VideoModel(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.config = cfg
        self.frames = FrameEncoder(cfg)
        self.temporal = TemporalTransformer(cfg)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def forward(self, clips):  # (B, T, C, H, W)
        B, T = clips.shape[:2]
        features = self.frames(clips.flatten(0, 1)).view(B, T, -1)  # (B, T, D)
        return self.head(self.temporal(features))  # (B, classes)


def loss_fn(model, batch):
    clips, labels = batch
    return F.cross_entropy(model(clips), labels)


def moving_clips(n, cfg: VideoConfig, seed=0):
    """`n` clips of a bright blob on a noisy background, and their classes.
    The class is the motion: slow and steady, fast and steady, oscillating back
    and forth, or still with one sudden dart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % cfg.classes
    t = torch.linspace(0, 1, cfg.frames)[None]  # (1, T)
    start = (torch.rand(n, 2, generator=g) * 0.4 + 0.3) * cfg.size  # (n, 2)
    angle = torch.rand(n, 1, generator=g) * 2 * math.pi
    jump = 0.3 + 0.4 * torch.rand(n, 1, generator=g)
    paths = torch.stack(
        [
            0.25 * t.expand(n, -1),
            0.9 * t.expand(n, -1),
            0.3 * torch.sin(4 * math.pi * t).expand(n, -1),
            0.7 * torch.sigmoid((t - jump) * 60),
        ]
    )  # (motions, n, T)
    path = paths[labels % len(MOTIONS), torch.arange(n)] * cfg.size * 0.5  # (n, T)
    ys = start[:, :1] + path * torch.sin(angle)
    xs = start[:, 1:] + path * torch.cos(angle)
    grid = torch.arange(cfg.size).float()
    blob = torch.exp(
        -(
            (grid[None, None, :, None] - ys[..., None, None]) ** 2
            + (grid[None, None, None, :] - xs[..., None, None]) ** 2
        )
        / (2 * (cfg.size / 12) ** 2)
    )
    noise = 0.1 * torch.randn(n, cfg.frames, cfg.channels, cfg.size, cfg.size, generator=g)
    return blob[:, :, None] + noise, labels  # (n, T, C, H, W), (n,)


def batch(size="small", batch_size=8, seed=0):
    return moving_clips(batch_size, SIZES[size] if isinstance(size, str) else size, seed)


def create_video(cfg: VideoConfig | dict, gradient_checkpointing=False) -> VideoModel:
    """The model, with checkpointing applied to both chains (frames and temporal)."""
    from memfit.models.switch import checkpointing

    if isinstance(cfg, dict):
        cfg = VideoConfig(**cfg)
    model = VideoModel(cfg)
    return checkpointing(model, gradient_checkpointing)


def build(size="small", batch_size=8, seed=0, gradient_checkpointing=False):
    cfg = SIZES[size]
    torch.manual_seed(seed)
    return create_video(cfg, gradient_checkpointing), batch(cfg, batch_size, seed + 1), loss_fn
