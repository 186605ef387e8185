"""memfit.checkpoint against the same code run without checkpointing."""

import copy
import re
import sys

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn

import memfit


def grads_of(module, *extra):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in extra]


def assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


class Counted(nn.Module):
    """Linear layer that counts how often its forward runs."""

    def __init__(self, n=8):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.calls = 0

    def forward(self, x, *, scale=1.0, mask=None):
        self.calls += 1
        y = torch.tanh(self.lin(x)) * scale
        return y if mask is None else y * mask


def test_kwargs_and_nested_non_tensor_outputs():
    torch.manual_seed(0)
    m = Counted()
    x = torch.randn(4, 8, requires_grad=True)
    mask = torch.rand(4, 8)

    def fn(x, *, scale, mask):
        y = m(x, scale=scale, mask=mask)
        return {"y": y, "pair": (y.sin(), 3, "label"), "none": None}

    ref = fn(x, scale=2.0, mask=mask)
    (ref["y"].sum() + ref["pair"][0].sum()).backward()
    expected = grads_of(m, x)
    m.zero_grad(), x.grad.zero_()
    out = memfit.checkpoint(fn, x, scale=2.0, mask=mask)
    assert out["pair"][1:] == (3, "label") and out["none"] is None
    (out["y"].sum() + out["pair"][0].sum()).backward()
    assert_all_equal(grads_of(m, x), expected)


def test_recomputes_once_in_backward():
    m = Counted()
    x = torch.randn(4, 8, requires_grad=True)
    memfit.checkpoint(m, x).sum().backward()
    assert m.calls == 2


def test_nested_checkpoints():
    torch.manual_seed(0)
    inner, outer = Counted(), Counted()
    x = torch.randn(4, 8, requires_grad=True)
    outer(inner(x)).pow(2).sum().backward()
    expected = grads_of(inner) + grads_of(outer, x)
    for p in [*inner.parameters(), *outer.parameters(), x]:
        p.grad = None
    memfit.checkpoint(lambda t: outer(memfit.checkpoint(inner, t)), x).pow(2).sum().backward()
    assert_all_equal(grads_of(inner) + grads_of(outer, x), expected)


def test_autograd_grad_and_double_backward():
    torch.manual_seed(0)
    m = Counted()
    x = torch.randn(4, 8, requires_grad=True)

    def penalty(run):
        y = run(m, x)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)  # a gradient penalty
        return torch.autograd.grad(gx.pow(2).sum(), list(m.parameters()))

    expected = penalty(lambda f, t: f(t))
    got = penalty(memfit.checkpoint)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_gradients_bitwise_equal(device):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.GELU(), nn.Linear(16, 16), nn.Dropout(0.3)).to(device)
    x = torch.randn(8, 16, device=device, requires_grad=True)
    torch.manual_seed(1)
    m(x).sum().backward()
    expected = grads_of(m, x)
    m.zero_grad(), x.grad.zero_()
    torch.manual_seed(1)
    memfit.checkpoint(m, x).sum().backward()
    assert_all_equal(grads_of(m, x), expected)


def test_autocast_replayed():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    expected = grads_of(m, x)
    m.zero_grad(), x.grad.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = memfit.checkpoint(m, x)
    y.float().sum().backward()  # backward outside autocast: the recompute must still run in bf16
    assert_all_equal(grads_of(m, x), expected)


def bn_net(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=momentum),
    )


def run_steps(model, call, steps=3):
    torch.manual_seed(3)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6)
        call(model, x).pow(2).mean().backward()
    return model


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average driven by num_batches_tracked
def test_batchnorm_statistics_updated_once(momentum):
    plain = run_steps(bn_net(momentum), lambda m, x: m(x))
    ours = run_steps(bn_net(momentum), memfit.checkpoint)
    torchs = run_steps(bn_net(momentum), lambda m, x: tuc.checkpoint(m, x, use_reentrant=False))
    for (name, a), b, _c in zip(plain.named_buffers(), ours.buffers(), torchs.buffers()):
        assert torch.equal(a, b), name
    assert plain[1].num_batches_tracked.item() == 3
    # PyTorch's own checkpoint runs the BatchNorm forward twice (pytorch#96136)
    assert torchs[1].num_batches_tracked.item() == 6
    assert not torch.equal(plain[1].running_mean, torchs[1].running_mean)
    assert_all_equal(grads_of(ours), grads_of(plain))


def test_state_seen_by_recompute_is_the_forwards():
    """Spectral norm's power iteration updates u in forward and its output
    depends on u: the recompute must see u as the forward did, or the
    gradients change."""

    def make():
        torch.manual_seed(0)
        return nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))

    x = torch.randn(4, 8)
    plain, ours, torchs = make(), make(), make()
    plain(x).sum().backward()
    memfit.checkpoint(ours, x).sum().backward()
    tuc.checkpoint(torchs, x, use_reentrant=False).sum().backward()
    assert_all_equal(grads_of(ours), grads_of(plain))
    assert_all_equal(list(ours.buffers()), list(plain.buffers()))
    assert not all(torch.equal(a, b) for a, b in zip(grads_of(torchs), grads_of(plain)))


def test_parameters_get_gradients_when_no_input_requires_grad():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8).requires_grad_(False)  # frozen embedding, as with LoRA
    block = Counted()
    ids = torch.randint(10, (4, 5))
    block(emb(ids)).sum().backward()
    expected = grads_of(block)
    block.zero_grad()
    memfit.checkpoint(block, emb(ids)).sum().backward()
    assert_all_equal(grads_of(block), expected)


def test_eval_mode_and_no_grad_are_plain_calls():
    m = Counted()
    x = torch.randn(4, 8, requires_grad=True)
    m.eval()
    memfit.checkpoint(m, x).sum().backward()
    assert m.calls == 1  # no recompute
    m.train()
    with torch.no_grad():
        y = memfit.checkpoint(m, x)
    assert m.calls == 2 and not y.requires_grad


def test_exception_inside_region_leaves_no_hooks():
    hooks = nn.modules.module._global_forward_pre_hooks
    before = len(hooks)

    def boom(x):
        nn.Linear(8, 8)(x)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        memfit.checkpoint(boom, torch.randn(2, 8, requires_grad=True))
    assert len(hooks) == before
    m = Counted()
    memfit.checkpoint(m, torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert m.lin.weight.grad is not None


def test_retain_graph_backward_twice():
    torch.manual_seed(0)
    m = bn_net()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    ref = copy.deepcopy(m)
    y = ref(x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    expected = grads_of(ref)
    y = memfit.checkpoint(m, x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    assert_all_equal(grads_of(m), expected)
    assert_all_equal(list(m.buffers()), list(ref.buffers()))


def _new_signature_shim(calls):
    """torch's generator with the signature of torch's main branch,
    `(fn, args, kwargs, *, ...)`, forwarding to the installed one."""
    original = tuc._checkpoint_without_reentrant_generator

    def generator(
        fn,
        args,
        kwargs,
        *,
        preserve_rng_state=True,
        context_fn=tuc.noop_context_fn,
        determinism_check="default",
        debug=False,
        early_stop=True,
    ):
        calls.append(fn)
        return original(fn, preserve_rng_state, context_fn, determinism_check, debug, early_stop, *args, **kwargs)

    return generator


def _old_signature_shim(calls):
    """The generator of torch releases before `early_stop` was added."""
    original = tuc._checkpoint_without_reentrant_generator

    def generator(
        fn,
        preserve_rng_state=True,
        context_fn=tuc.noop_context_fn,
        determinism_check="default",
        debug=False,
        *args,
        **kwargs,
    ):
        calls.append(fn)
        return original(fn, preserve_rng_state, context_fn, determinism_check, debug, True, *args, **kwargs)

    return generator


@pytest.mark.parametrize("shim", [_new_signature_shim, _old_signature_shim])
@pytest.mark.parametrize("strategy", ["blocks", "segments:2", "selective"])
def test_both_generator_signatures(monkeypatch, shim, strategy):
    ckpt = sys.modules["memfit.core.checkpointing"]  # memfit.checkpoint is the function
    from test_wrapping import LayerDropNet, assert_same_training, drop_loss

    calls = []
    monkeypatch.setattr(ckpt, "_open", ckpt._binding(shim(calls)))
    torch.manual_seed(0)
    assert_same_training(LayerDropNet(skip=(2,)), torch.randn(4, 8), drop_loss, strategy)
    assert calls  # the shim, not the installed generator, ran the regions


def test_unknown_generator_signature_fails_at_import_in_one_sentence():
    ckpt = sys.modules["memfit.core.checkpointing"]  # memfit.checkpoint is the function
    with pytest.raises(ImportError, match=re.escape(f"torch {torch.__version__}") + ".*use torch 2.8 to 2.13"):
        ckpt._binding(lambda function, inputs: None)


@pytest.mark.parametrize("strategy", ["selective", "pointwise"])
def test_selective_regions_keep_their_saved_tensors_out_of_memfits_own_hooks(strategy):
    """NOTE [torch's generator]: from torch 2.14, a selective checkpoint warns when a saved-tensor hook is around
    it (its tensors will go through such hooks by default); the hook around memfit's is its own observer, which
    must not see them, so memfit says so and torch does not warn (on older torch there is nothing to say)."""
    import warnings

    m = memfit.apply(nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]), strategy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saved_tensors_hooks.*", category=FutureWarning)
        m(torch.randn(2, 8, requires_grad=True)).sum().backward()
