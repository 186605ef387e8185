"""Property: on any chain of blocks, any strategy trains exactly like no checkpointing."""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recompute import counting, recomputes
from torch import nn

import memfit
from memfit.core.wrapping import wrapped_blocks


class RandomBlock(nn.Module):
    def __init__(self, width, dropout, batchnorm, activation, residual):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.LayerNorm(width)
        self.act = activation()
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x, scale=None, *, mask=None):
        y = self.drop(self.act(self.norm(self.fc(x))))
        if mask is not None:
            y = y * mask
        if scale is not None:
            y = y * scale
        return x + y if self.residual else y


class Chain(nn.Module):
    def __init__(self, depth, extra_args, **block):
        super().__init__()
        self.blocks = nn.ModuleList([RandomBlock(**block) for _ in range(depth)])
        self.extra_args = extra_args

    def forward(self, x, mask):
        for b in self.blocks:
            x = b(x, 0.5, mask=mask) if self.extra_args else b(x)
        return x


@st.composite
def chains(draw):
    depth = draw(st.integers(1, 6))
    chain = dict(
        depth=depth,
        width=draw(st.integers(2, 12)),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        batchnorm=draw(st.booleans()),
        activation=draw(st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh])),
        residual=draw(st.booleans()),
        extra_args=draw(st.booleans()),
    )
    strategy = draw(
        st.one_of(
            st.sampled_from(["none", "blocks", "sqrt", "selective", "scores", "pointwise"]),
            st.integers(1, 4).map(lambda k: f"every:{k}"),
            st.integers(1, depth).map(lambda n: f"segments:{n}"),
        )
    )
    return chain, strategy, draw(st.integers(2, 6)), draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_any_chain_any_strategy_same_gradients_and_buffers(case):
    chain, strategy, batch, seed = case
    torch.manual_seed(seed)
    plain = Chain(**chain)
    # a single block is not a "chain of repeated blocks": name it, as a user would
    ckpt = memfit.apply(copy.deepcopy(plain), strategy, blocks="blocks" if chain["depth"] == 1 else None)
    x = torch.randn(batch, chain["width"])
    mask = (torch.rand(batch, chain["width"]) > 0.3).float()
    assert bool(wrapped_blocks(ckpt)) == (strategy != "none"), strategy
    for step in range(2):
        grads = []
        for model in (plain, ckpt):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed + step)
            with counting() as recomputed:
                model(x, mask).pow(2).mean().backward()
            grads.append([p.grad for p in model.parameters()])
        assert recomputed.anything == recomputes(strategy), (strategy, recomputed)
        for a, b in zip(*grads):
            assert torch.equal(a, b), strategy
    for a, b in zip(plain.buffers(), ckpt.buffers()):
        assert torch.equal(a, b), strategy
