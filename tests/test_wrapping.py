"""memfit.apply / memfit.remove: every strategy trains exactly like the plain model."""

import copy

import pytest
import torch
from recompute import counting, recomputes
from torch import nn

import memfit
from memfit import MemfitError
from memfit.core.wrapping import SegmentWarning, wrapped_blocks
from memfit.models import REGISTRY

STRATEGIES = [
    "none",
    "blocks",
    "every:2",
    "every:3",
    "segments:2",
    "segments:3",
    "sqrt",
    "selective",
    "scores",
    "pointwise",
    "offload",
]  # offload: on CPU, the mechanism only (it moves nothing)


def step(model, batch, loss_fn, seed=1):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(model, batch, loss_fn, strategy, steps=2, blocks=None):
    """The same losses, gradients and buffers, bitwise, with `strategy` as without; and the strategy wrapped
    blocks (unless `none`) and recomputed in backward (unless it only keeps or offloads)."""
    plain, wrapped = copy.deepcopy(model), memfit.apply(copy.deepcopy(model), strategy, blocks=blocks)
    assert bool(wrapped_blocks(wrapped)) == (strategy != "none"), strategy
    for s in range(steps):
        loss_a, grads_a = step(plain, batch, loss_fn, s)
        with counting() as recomputed:
            loss_b, grads_b = step(wrapped, batch, loss_fn, s)
        assert recomputed.anything == recomputes(strategy), (strategy, recomputed)
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


def test_segment_split_by_a_loop_that_transforms_between_blocks_stays_exact():
    """A block fed something other than the previous block's output ends the
    segment's region and starts a new one: one warning, the same gradients."""
    torch.manual_seed(0)
    model = MaskedChain(between=lambda x: x * 1.0)
    with pytest.warns(SegmentWarning, match="recomputed in parts"):
        assert_same_training(model, masked_batch(), masked_loss, "segments:2")


def test_names_and_state_dict_unchanged_and_portable():
    model, _, _ = REGISTRY["gpt"].build("tiny")
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    plain_state = copy.deepcopy(model.state_dict())
    for strategy in STRATEGIES:
        memfit.apply(model, strategy)
        assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
        fresh, _, _ = REGISTRY["gpt"].build("tiny", seed=5)
        fresh.load_state_dict(model.state_dict())  # wrapped -> plain
        model.load_state_dict(fresh.state_dict())  # plain -> wrapped
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
    memfit.apply(model, "segments:3")  # the units themselves: tests/test_strategies.py
    assert [n for n, _ in wrapped_blocks(model)] == [str(i) for i in range(7)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("every:0", "positive integer"),
        ("segments:-1", "positive integer"),
        ("every:x", "positive integer"),
        ("segments:9", "more segments than the 7 blocks"),
        ("sqrt:2", "takes no argument"),
        ("checkpoint-all", "unknown strategy"),
    ],
)
def test_bad_strategies(bad, message):
    model = nn.Sequential(*[CountingBlock() for _ in range(7)])
    with pytest.raises(MemfitError, match=message):
        memfit.apply(model, bad)


class DropBlock(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n, 2 * n), nn.Linear(2 * n, n)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(self.fc2(self.drop(torch.relu(self.fc1(x)))))


class LayerDropNet(nn.Module):
    """A loop written the way LayerDrop is (Wav2Vec2, HuBERT): a random draw
    between blocks decides whether the next block runs. `skip` forces blocks
    out, to hit the cases that matter every time."""

    def __init__(self, n_blocks=6, p=0.3, skip=()):
        super().__init__()
        self.layers = nn.ModuleList([DropBlock() for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(8)
        self.p, self.skip, self.ran = p, set(skip), []

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if self.training and (torch.rand([]) < self.p or i in self.skip):
                continue
            self.ran.append(i)
            x = layer(x)
        return self.norm(x)


def drop_loss(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("strategy", ["segments:2", "segments:3", "sqrt", "blocks", "every:2", "selective"])
@pytest.mark.parametrize("skip", [(), (2,), (5,), (0, 1)])
def test_layerdrop_between_blocks_gives_the_same_gradients(strategy, skip):
    """Random numbers drawn between blocks, and blocks skipped anywhere in a
    segment (its first, a middle one, its last), recompute exactly."""
    torch.manual_seed(0)
    model = LayerDropNet(skip=skip)
    assert_same_training(model, torch.randn(4, 8), drop_loss, strategy, steps=4)


def test_layerdrop_test_hits_skips_inside_segments():
    """The test above is only worth something if blocks are skipped inside
    segments: its plain run, on the same random stream (same model, batch and
    seeds), skips an inner block of a `segments:2` segment (1 or 4) in some step."""
    torch.manual_seed(0)
    model = LayerDropNet()
    batch, ran = torch.randn(4, 8), []
    for s in range(4):
        model.ran = []
        step(model, batch, drop_loss, s)
        ran.append(model.ran)
    assert any({1, 4} - set(r) for r in ran), ran


class AutocastChain(nn.Module):
    """Blocks alternately under bf16 autocast and in fp32, switched by the loop."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([DropBlock() for _ in range(4)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i % 2 == 0):
                x = layer(x).float()
        return x


@pytest.mark.parametrize("strategy", ["segments:1", "segments:2"])
def test_segment_recomputes_each_block_under_its_own_autocast(strategy):
    torch.manual_seed(0)
    assert_same_training(AutocastChain(), torch.randn(4, 8), drop_loss, strategy)


def nothing_installed():
    from torch.nn.modules import module

    return (
        torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        and not module._global_forward_pre_hooks
        and not module._global_forward_hooks
    )


class Failing(DropBlock):
    fail = False

    def forward(self, x):
        if self.fail:
            raise ValueError("boom")
        return super().forward(x)


class FailingNet(LayerDropNet):
    def __init__(self, fail_between=False):
        super().__init__(p=0.0)
        self.layers = nn.ModuleList([Failing() for _ in range(6)])
        self.fail_between = fail_between

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.fail_between and i == 3:
                raise KeyError("between blocks")
        return self.norm(x)


@pytest.mark.parametrize("strategy", ["segments:2", "blocks", "selective", "sqrt"])
@pytest.mark.parametrize("where", ["in a block", "between blocks", "after a skipped last block"])
def test_nothing_stays_installed_after_a_failure_or_a_skipped_last_block(strategy, where):
    torch.manual_seed(0)
    if where == "after a skipped last block":
        model = memfit.apply(LayerDropNet(p=0.0, skip=(2,)), strategy)  # segments:2 is [0, 3) [3, 6)
        loss = drop_loss(model, torch.randn(4, 8))
        assert nothing_installed()
        loss.backward()
    else:
        model = memfit.apply(FailingNet(fail_between=where == "between blocks"), strategy)
        model.layers[4].fail = where == "in a block"
        with pytest.raises((ValueError, KeyError)):
            drop_loss(model, torch.randn(4, 8))
    assert nothing_installed()
    plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    plain(torch.randn(4, 8)).sum().backward()  # an unrelated model's backward in the same process
    assert nothing_installed()
    model.layers[4].fail = False if where == "in a block" else None
    if where != "between blocks":  # the same model still trains exactly
        assert_same_training(memfit.remove(model), torch.randn(4, 8), drop_loss, strategy)


def test_blocks_called_from_outside_a_forward_are_checkpointed_one_by_one():
    torch.manual_seed(0)
    layers = nn.ModuleList([DropBlock() for _ in range(4)])
    memfit.apply(layers, "segments:1")

    def loss_fn(model, x):
        for layer in model:
            x = layer(x)
        return x.pow(2).mean()

    with pytest.warns(SegmentWarning, match="one by one"):
        assert_same_training(layers, torch.randn(4, 8), loss_fn, "segments:1")


class SharedLoop(nn.Module):
    """The first block runs again in the middle of the loop (weights shared across depth)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([DropBlock() for _ in range(4)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1:
                x = self.layers[0](x)
        return x


def test_a_block_called_again_out_of_order_stays_exact():
    torch.manual_seed(0)
    with pytest.warns(SegmentWarning, match="out of order"):
        assert_same_training(SharedLoop(), torch.randn(4, 8), drop_loss, "segments:1")


def test_a_strategy_per_chain_in_one_apply():
    """{chain: strategy}: each named chain gets its own, the other chains are left plain."""
    import copy

    from memfit.models import vit_jepa

    model, batch, loss_fn = vit_jepa.build("tiny", batch_size=2)
    memfit.apply(model, {"encoder.blocks": "selective", "predictor.*": "sqrt"})
    modes = dict(wrapped_blocks(model))
    assert {n for n in modes if n.startswith("encoder.")} == {f"encoder.blocks.{i}" for i in range(3)}
    assert set(map(str, modes.values())) == {"selective", "recompute"}
    assert not any(n.startswith("target") for n in modes)
    plain = copy.deepcopy(model)
    memfit.remove(plain)
    grads = []
    for m in (plain, model):
        torch.manual_seed(0)
        loss_fn(m, batch).backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(MemfitError, match="maps chains to strategies"):
        memfit.apply(model, {3: "blocks"})


class HookProbe(nn.Module):
    """Records, inside its forward, what the saved-tensor hooks on top do to a tensor autograd would save."""

    def __init__(self, seen):
        super().__init__()
        self.fc, self.seen = nn.Linear(8, 8), seen

    def forward(self, x):
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.seen.append(None if hooks is None else hooks[0](torch.arange(3.0)))
        return torch.tanh(self.fc(x))


def test_offload_sends_what_each_block_saves_through_save_on_cpu():
    """On a CPU the effect of `offload` cannot show in memory (there is nowhere to move to), so the mechanism is
    checked: inside each block, autograd's pack hook is save_on_cpu's, which packs (device, CPU copy)."""
    for strategy, expected in (("offload", 2), ("none", 0)):
        seen = []
        model = memfit.apply(nn.Sequential(HookProbe(seen), HookProbe(seen)), strategy)
        model(torch.randn(2, 8)).sum().backward()
        packed = [p for p in seen if p is not None]
        assert len(seen) == 2 and len(packed) == expected, (strategy, seen)
        assert all(p[0] == torch.device("cpu") and torch.equal(p[1], torch.arange(3.0)) for p in packed)


@pytest.mark.parametrize("strategy", ["blocks", "segments:2", "sqrt", "selective", "pointwise"])
def test_blocks_held_as_attributes_train_exactly(strategy):
    """timm's RegNet layout (tests/test_blocks.py): blocks b1, b2, ... of attribute stages, in-place adds and
    activations, BatchNorm; a segment crosses from one stage to the next."""
    from test_blocks import RegNet

    torch.manual_seed(0)
    assert_same_training(RegNet(), torch.randn(2, 3, 16, 16), lambda m, x: m(x).square().mean(), strategy)


class DenseLayer(nn.Module):
    """torchvision's DenseNet layer: it takes the list of every feature so far."""

    def __init__(self, n, k=4):
        super().__init__()
        self.norm, self.fc = nn.BatchNorm1d(n), nn.Linear(n, k)

    def forward(self, features):
        return torch.relu(self.fc(self.norm(torch.cat(features, 1))))


class DenseNet(nn.Module):
    """The loop appends each layer's output to the list it passed to the layer (torchvision's _DenseBlock)."""

    def __init__(self, n=4, k=4, depth=3):
        super().__init__()
        self.block = nn.ModuleDict({f"denselayer{i + 1}": DenseLayer(n + i * k, k) for i in range(depth)})

    def forward(self, x):
        features = [x]
        for layer in self.block.values():
            features.append(layer(features))
        return torch.cat(features, 1)


@pytest.mark.parametrize("strategy", ["blocks", "every:2", "selective", "pointwise"])
def test_inputs_changed_after_the_call_are_recomputed_as_they_were(strategy):
    """NOTE [inputs changed after the call]: the recompute sees the list as the block saw it, not as the loop
    left it."""
    torch.manual_seed(0)
    assert_same_training(DenseNet(), torch.randn(4, 4), lambda m, x: m(x).square().mean(), strategy)


class HistoryLayer(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x, history):
        return torch.tanh(self.fc(x + torch.stack(history).sum(0)))


class History(nn.Module):
    """Each layer gets the previous one's output and, as an extra argument, the list of every output so far,
    which the loop appends to after the call."""

    def __init__(self, depth=4):
        super().__init__()
        self.layers = nn.ModuleList([HistoryLayer() for _ in range(depth)])

    def forward(self, x):
        history = [x]
        for layer in self.layers:
            x = layer(x, history)
            history.append(x)
        return x


@pytest.mark.parametrize("strategy", ["segments:1", "segments:2"])
def test_a_segment_recomputes_its_later_calls_with_their_arguments_as_they_were(strategy):
    torch.manual_seed(0)
    assert_same_training(History(), torch.randn(4, 4), lambda m, x: m(x).square().mean(), strategy)


class SharedBlock(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.norm, self.fc1, self.fc2, self.drop = (
            nn.LayerNorm(n),
            nn.Linear(n, 2 * n),
            nn.Linear(2 * n, n),
            nn.Dropout(0.2),
        )

    def forward(self, x, step):
        return x + self.drop(self.fc2(torch.relu(self.fc1(self.norm(x))))) * (1 + step)


class Universal(nn.Module):
    """A weight-shared (universal) transformer: one block called `depth` times, with the step number as an
    extra argument (ALBERT's layer group, RAFT's update block do the same)."""

    def __init__(self, depth=4):
        super().__init__()
        self.embed, self.block, self.head, self.depth = nn.Linear(8, 8), SharedBlock(), nn.Linear(8, 3), depth

    def forward(self, x):
        x = self.embed(x)
        for step in range(self.depth):
            x = self.block(x, 0.1 * step)
        return self.head(x)


def universal_loss(m, x):
    return m(x).square().mean()


def test_a_block_called_several_times_is_a_chain_of_its_calls():
    """NOTE [blocks called several times]: each call is a block, 'block#K', in call order; without a trace the
    block is not found, and the error says how it would be."""
    from memfit.planning.simulation import blocks_of

    model, batch = Universal(), torch.randn(4, 8)
    assert blocks_of(model, batch, universal_loss) == [f"block#{k}" for k in range(4)]
    assert blocks_of(model, batch, universal_loss, ["block"]) == [f"block#{k}" for k in range(4)]
    with pytest.raises(MemfitError, match="batch="):
        memfit.apply(Universal(), "blocks")


@pytest.mark.parametrize("strategy", ["blocks", "every:2", "segments:2", "sqrt", "selective", "pointwise"])
def test_a_block_called_several_times_trains_exactly_call_by_call(strategy):
    """Each call is checkpointed under its own unit's mode; the shared parameters get the sum of every call's
    gradient, bitwise as without checkpointing."""
    torch.manual_seed(0)
    model = Universal()
    assert_same_training(model, torch.randn(4, 8), universal_loss, strategy, blocks=[f"block#{k}" for k in range(4)])
    wrapped = memfit.apply(copy.deepcopy(model), strategy, batch=torch.randn(4, 8), loss_fn=universal_loss)
    expected = {"blocks": 4, "every:2": 2, "segments:2": 4, "sqrt": 4, "selective": 4, "pointwise": 4}[strategy]
    assert len(wrapped_blocks(wrapped)) == expected


def test_calls_past_the_traced_ones_are_recomputed_with_the_last_calls_mode():
    """The loop runs longer than in the step that was traced: the extra calls are checkpointed on their own."""
    torch.manual_seed(0)
    longer = Universal(depth=6)
    assert_same_training(
        longer, torch.randn(4, 8), universal_loss, "segments:1", blocks=[f"block#{k}" for k in range(4)]
    )


def test_a_plan_chooses_per_call_and_applies_to_a_fresh_model_from_json():
    torch.manual_seed(0)
    model, batch = Universal(depth=6), torch.randn(256, 8)
    plan = memfit.plan(model, batch, universal_loss, "85%", cost="flops")
    assert [b.name for b in plan.blocks] == [f"block#{k}" for k in range(6)]
    assert len({b.mode for b in plan.blocks}) > 1, plan  # the calls do not all get the same mode
    report = memfit.verify(model, batch, universal_loss, plan, steps=1)
    assert report["passed"] and report["grads_bitwise_equal"]
    assert report["checkpointed"]["peak_bytes"] == plan.predicted_peak_bytes <= plan.budget_bytes
    fresh = memfit.apply(Universal(depth=6), memfit.Plan.from_json(plan.to_json()))
    assert [n for n, _ in wrapped_blocks(fresh)] == [b.name for b in plan.blocks if str(b.mode) != "keep"]
