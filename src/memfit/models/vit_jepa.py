"""A JEPA model: a ViT context encoder, a predictor, and an EMA
target encoder that runs without gradients. The predictor predicts the target
encoder's features of masked patches from the context encoder's features of
the visible ones.

Shapes: B batch, N patches, Nc context patches, Nt target patches, D encoder
width, Dp predictor width.

Checkpointing is selectable separately for the encoder and the predictor
("encoder OR predictor"): `create_jepa(cfg, gradient_checkpointing=
{"encoder": "blocks", "predictor": False})`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class JEPAConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    pred_dim: int = 96
    pred_depth: int = 4
    pred_heads: int = 3
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.25  # fraction of patches to predict


SIZES = {
    "tiny": JEPAConfig(img_size=16, embed_dim=32, depth=3, num_heads=2, pred_dim=16, pred_depth=2, pred_heads=2),
    "small": JEPAConfig(),
    "base": JEPAConfig(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, pred_dim=384, pred_depth=6, pred_heads=12
    ),
}


class Block(nn.Module):
    """Pre-norm transformer block with bidirectional attention."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: JEPAConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        n = (cfg.img_size // cfg.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, n, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, images, keep=None):  # images (B, C, H, W)
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        if keep is not None:
            x = x[:, keep]  # (B, Nc, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self, cfg: JEPAConfig):
        super().__init__()
        n = (cfg.img_size // cfg.patch_size) ** 2
        self.embed = nn.Linear(cfg.embed_dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.pred_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n, cfg.pred_dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg.pred_dim, cfg.pred_heads, cfg.mlp_ratio) for _ in range(cfg.pred_depth)])
        self.norm = nn.LayerNorm(cfg.pred_dim)
        self.proj = nn.Linear(cfg.pred_dim, cfg.embed_dim)

    def forward(self, context, keep, targets):  # context (B, Nc, D)
        B = context.shape[0]
        x = self.embed(context) + self.pos_embed[:, keep]  # (B, Nc, Dp)
        m = self.mask_token.expand(B, len(targets), -1) + self.pos_embed[:, targets]  # (B, Nt, Dp)
        x = torch.cat([x, m], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, -len(targets) :]))  # (B, Nt, D)


class JEPA(nn.Module):
    def __init__(self, cfg: JEPAConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    def forward(self, images, keep, targets):
        """Predicted and target features of the target patches, (B, Nt, D) each."""
        predicted = self.predictor(self.encoder(images, keep), keep, targets)
        with torch.no_grad():
            target = self.target_encoder(images)[:, targets]
            target = F.layer_norm(target, target.shape[-1:])
        return predicted, target

    @torch.no_grad()
    def update_target(self, momentum=0.996):
        """EMA of the context encoder's weights into the target encoder."""
        for t, s in zip(self.target_encoder.parameters(), self.encoder.parameters()):
            t.lerp_(s, 1 - momentum)


def loss_fn(model, batch):
    predicted, target = model(*batch)
    return F.smooth_l1_loss(predicted, target)


def random_masks(cfg: JEPAConfig, generator=None):
    """Indices of context and target patches: a random fraction `mask_ratio`
    of the patches is predicted from the rest."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    order = torch.randperm(n, generator=generator)
    n_target = max(1, int(n * cfg.mask_ratio))
    return order[n_target:].sort().values, order[:n_target].sort().values


def batch(size="small", batch_size=32, seed=0):
    """Smooth random images (blurred noise, so neighbouring patches are related) and masks."""
    cfg = SIZES[size] if isinstance(size, str) else size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, cfg.in_chans, cfg.img_size // 4, cfg.img_size // 4, generator=g)
    images = F.interpolate(noise, size=cfg.img_size, mode="bilinear", align_corners=False)
    return (images, *random_masks(cfg, g))


def create_jepa(cfg: JEPAConfig | dict, gradient_checkpointing=False) -> JEPA:
    """The model, with checkpointing applied to the encoder, the predictor or
    both: a bool, a strategy string or Plan for both, or a dict
    {"encoder": ..., "predictor": ...}."""
    from memfit.core import schedule
    from memfit.models.switch import checkpointing

    if isinstance(cfg, dict):
        cfg = JEPAConfig(**cfg)
    model = JEPA(cfg)
    if not isinstance(gradient_checkpointing, dict):
        s = schedule.parse(False if gradient_checkpointing is None else gradient_checkpointing)
        if not isinstance(s.strategy, str):  # a plan (or a budget): for the whole model
            return checkpointing(model, s)
        gradient_checkpointing = {"encoder": s.strategy, "predictor": s.strategy}
    parts = gradient_checkpointing
    unknown = set(parts) - {"encoder", "predictor"}
    if unknown:
        from memfit.errors import MemfitError

        raise MemfitError(f"gradient_checkpointing parts {sorted(unknown)} are unknown; use encoder and predictor.")
    return checkpointing(model, {f"{part}.blocks": value for part, value in parts.items()})  # one apply


def build(size="small", batch_size=32, seed=0, gradient_checkpointing=False):
    cfg = SIZES[size]
    torch.manual_seed(seed)
    return create_jepa(cfg, gradient_checkpointing), batch(cfg, batch_size, seed + 1), loss_fn
