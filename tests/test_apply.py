"""memfit.apply / memfit.remove: every strategy trains exactly like the plain model."""
import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import MemfitError
from memfit.apply import wrapped_blocks
from memfit.models import REGISTRY

STRATEGIES = ["none", "blocks", "every:2", "every:3", "segments:2", "segments:3", "sqrt", "selective", "scores",
              "pointwise", "offload"]  # offload: on CPU, the mechanism only (it moves nothing)


def step(model, batch, loss_fn, seed=1):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(model, batch, loss_fn, strategy, steps=2):
    plain, wrapped = copy.deepcopy(model), memfit.apply(copy.deepcopy(model), strategy)
    for s in range(steps):
        loss_a, grads_a = step(plain, batch, loss_fn, s)
        loss_b, grads_b = step(wrapped, batch, loss_fn, s)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys()
        for n in grads_a:
            assert torch.equal(grads_a[n], grads_b[n]), n
    for (n, a), b in zip(plain.named_buffers(), wrapped.buffers()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["gpt", "resnet-se", "mlp"])
def test_every_strategy_on_builtin_models(name, strategy):
    model, batch, loss_fn = REGISTRY[name].build("tiny", batch_size=4)
    assert_same_training(model, batch, loss_fn, strategy)


class MaskedBlock(nn.Module):
    """A block with an extra positional argument, a keyword argument and a tuple result."""

    def __init__(self, n=8):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.norm = nn.BatchNorm1d(n)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, mask, *, position=None):
        y = self.drop(torch.relu(self.norm(self.fc(x)))) * mask
        if position is not None:
            y = y + position
        return x + y, y.detach().abs().mean()


class MaskedChain(nn.Module):
    def __init__(self, n_blocks=5, between=None):
        super().__init__()
        self.layers = nn.ModuleList([MaskedBlock() for _ in range(n_blocks)])
        self.between = between

    def forward(self, x, mask, position):
        for layer in self.layers:
            x, _ = layer(x, mask, position=position)
            if self.between:
                x = self.between(x)
        return x


def masked_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), (torch.rand(6, 8, generator=g) > 0.2).float(), torch.randn(8, generator=g)


def masked_loss(model, batch):
    return model(*batch).pow(2).mean()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_blocks_with_extra_args_kwargs_and_tuple_outputs(strategy):
    torch.manual_seed(0)
    assert_same_training(MaskedChain(), masked_batch(), masked_loss, strategy)


def test_segment_refuses_a_loop_that_transforms_between_blocks():
    torch.manual_seed(0)
    model = memfit.apply(MaskedChain(between=lambda x: x * 1.0), "segments:2")
    with pytest.raises(MemfitError, match="previous block's output"):
        masked_loss(model, masked_batch())
    # per-block strategies do not care what the loop does between blocks
    memfit.apply(model, "blocks")
    masked_loss(model, masked_batch()).backward()


def test_names_and_state_dict_unchanged_and_portable():
    model, _, _ = REGISTRY["gpt"].build("tiny")
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    plain_state = copy.deepcopy(model.state_dict())
    for strategy in STRATEGIES:
        memfit.apply(model, strategy)
        assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
        fresh, _, _ = REGISTRY["gpt"].build("tiny", seed=5)
        fresh.load_state_dict(model.state_dict())          # wrapped -> plain
        model.load_state_dict(fresh.state_dict())          # plain -> wrapped
        memfit.remove(model)
        assert list(model.state_dict()) == keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain_state[k])


def test_remove_restores_the_plain_model():
    model, _, _ = REGISTRY["resnet-se"].build("tiny")
    memfit.apply(model, "sqrt")
    assert wrapped_blocks(model)
    memfit.remove(model)
    assert not wrapped_blocks(model)
    assert all("forward" not in m.__dict__ and "_memfit" not in m.__dict__ for m in model.modules())


def test_apply_twice_replaces_the_strategy():
    model, _, _ = REGISTRY["gpt"].build("tiny")
    memfit.apply(model, "blocks")
    memfit.apply(model, "every:2")
    assert [n for n, _ in wrapped_blocks(model)] == ["transformer.h.0", "transformer.h.2"]


def test_deepcopy_of_a_wrapped_model_trains_itself():
    """An EMA target network is a deepcopy of the wrapped model."""
    model, batch, loss_fn = REGISTRY["gpt"].build("tiny")
    memfit.apply(model, "blocks")
    ema = copy.deepcopy(model)
    block = ema.transformer.h[0]
    assert block.forward.__self__ is block
    loss_fn(ema, batch).backward()
    assert block.attn.c_attn.weight.grad is not None
    assert model.transformer.h[0].attn.c_attn.weight.grad is None


class CountingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("strategy, calls_per_block", [("blocks", 2), ("segments:1", 2), ("none", 1)])
def test_recompute_only_in_training_mode(strategy, calls_per_block):
    model = nn.Sequential(*[CountingBlock() for _ in range(3)])
    memfit.apply(model, strategy)
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()
    assert [b.calls for b in model] == [calls_per_block] * 3
    model.eval()
    model(x).sum().backward()
    assert [b.calls for b in model] == [calls_per_block + 1] * 3


def test_every_k_and_segments_choose_the_documented_blocks():
    model = nn.Sequential(*[CountingBlock() for _ in range(7)])
    memfit.apply(model, "every:3")
    assert [n for n, _ in wrapped_blocks(model)] == ["0", "3", "6"]
    from memfit.strategies import parse
    assert [(u.start, u.stop) for u in parse("segments:3", 7)] == [(0, 3), (3, 5), (5, 7)]
    assert [(u.start, u.stop) for u in parse("sqrt", 12)] == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize("bad, message", [
    ("every:0", "positive integer"), ("segments:-1", "positive integer"), ("every:x", "positive integer"),
    ("segments:9", "more segments than the 7 blocks"), ("sqrt:2", "takes no argument"),
    ("checkpoint-all", "unknown strategy")])
def test_bad_strategies(bad, message):
    model = nn.Sequential(*[CountingBlock() for _ in range(7)])
    with pytest.raises(MemfitError, match=message):
        memfit.apply(model, bad)
