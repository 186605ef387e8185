"""A character-level GPT decoder in plain PyTorch, after nanoGPT's model.py.

Shapes: B batch, T sequence length, C embedding width, nh heads, hs = C / nh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256  # longest sequence
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.1
    bias: bool = True


# From a model that runs a test in a second to GPT-2 small (124M with its vocabulary).
SIZES = {
    "tiny": GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=64),
    "small": GPTConfig(),
    "medium": GPTConfig(block_size=256, n_layer=8, n_head=8, n_embd=512),
    "gpt2": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head or cfg.block_size < 1:
            raise ValueError(
                f"n_embd {cfg.n_embd} must be a multiple of n_head {cfg.n_head}, and block_size "
                f"{cfg.block_size} at least 1"
            )
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):  # idx: (B, T) token ids
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)


def loss_fn(model, batch):
    idx, targets = batch
    logits = model(idx)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def create_gpt(cfg: GPTConfig | dict, gradient_checkpointing=False) -> GPT:
    """The model, with `gradient_checkpointing` (bool, strategy, Plan) applied to its layers."""
    from memfit.models.switch import checkpointing

    return checkpointing(GPT(GPTConfig(**cfg) if isinstance(cfg, dict) else cfg), gradient_checkpointing)


def batch(size="small", batch_size=8, seed=0):
    """Random token ids and their next tokens, (B, T) each."""
    cfg = SIZES[size]
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=generator)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def build(size="small", batch_size=8, seed=0, gradient_checkpointing=False):
    """Model, a random batch of token ids, and the loss function."""
    torch.manual_seed(seed)
    return create_gpt(SIZES[size], gradient_checkpointing), batch(size, batch_size, seed + 1), loss_fn


def tensor_parallel(model: GPT, mesh) -> GPT:
    """Tensor parallelism over the 1-D `mesh`, Megatron style in each block's MLP: the first linear split by
    columns, the second by rows (its output all-reduced). The attention stays replicated (its fused
    query-key-value projection is split by `split(C)`, which a column shard would break)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.transformer.h:
        parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    return model
