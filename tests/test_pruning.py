"""NOTE [pruned recompute]: a selective recompute runs only the ops backward needs, and is never wrong."""

import pytest
import torch
from torch import nn

from memfit.core import pruning, strategies
from memfit.core.checkpointing import run
from memfit.core.flops import counting_flops


class Residual(nn.Module):
    """h = x + l2(relu(l1(x))); out = l3(norm(h)): with h saved, l2's output is needed by nothing."""

    def __init__(self, d=16, p=0.0):
        super().__init__()
        self.l1, self.l2, self.l3, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.drop = nn.Dropout(p)
        self.swap = False  # the recompute takes another path (a bug a user's model can have)

    def forward(self, x):
        a = self.drop(torch.relu(self.l1(x)))
        c = self.l2(a)
        h = x + c
        if self.swap:
            h = h + self.l3(c)  # reads l2's output, which the forward's path did not need
        return self.l3(self.drop(self.norm(h)))


def _saving(model, x, name):
    """An ops: mode saving the first op of this name in the block's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in pruning.IGNORED and func not in strategies.UNNUMBERED:
                names.append(strategies.op_name(func))
            return func(*args, **(kwargs or {}))

    with Names():
        model(x)
    return f"ops:{name}@{names.index(name)}"


def _rerun(mode):
    """The mode's policy, recomputed by torch's rerun of the block (what the presets get), not on demand."""
    policy = strategies.policy(strategies.Mode.parse(mode))
    policy.on_demand = False
    return policy


def _grads(model, x, mode=None, seed=0):
    """Gradients of a step, and the FLOPs its backward counts (the recompute's included)."""
    torch.manual_seed(seed)
    out = model(x) if mode is None else run(model, (x,), {}, policy=_rerun(mode))
    with counting_flops() as counter:
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()], allow_unused=True)
    return grads, counter.get_total_flops()


def _same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_an_output_nothing_needs_is_not_recomputed_and_gradients_are_exact(p):
    """With the residual sum saved, the recompute runs l1 (its output is saved
    by relu) and skips l2, whose output only fed the sum: backward counts one
    linear layer's forward FLOPs more than the plain backward, not two; and
    the gradients are bitwise the plain ones (dropout: random ops always run,
    so the generator advances as in the forward)."""
    torch.manual_seed(0)
    model, x = Residual(p=p), torch.randn(8, 16, requires_grad=True)
    plain, plain_flops = _grads(model, x)
    pruned, flops = _grads(model, x, _saving(model, x, "add.Tensor"))
    assert _same(plain, pruned)
    assert flops - plain_flops == 2 * 8 * 16 * 16


class InPlace(nn.Module):
    """An in-place write no later op reads: `t += l2(x)` after `tanh(t)` (which saves its own output)."""

    def __init__(self, d=16):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        t = self.l1(x * 1.0)
        u = torch.tanh(t)
        t.add_(self.l2(x))
        return self.l3(u)


def test_an_in_place_write_nothing_reads_is_skipped_with_what_it_adds():
    """The recompute runs l1 (tanh reads its output) and skips l2 and the
    in-place add it feeds (its target, read before, then counts as a
    placeholder): exact gradients, l2's FLOPs gone."""
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(8, 16, requires_grad=True)
    plain, plain_flops = _grads(model, x)
    pruned, flops = _grads(model, x, "ops:mul.Tensor@0")
    assert _same(plain, pruned)
    assert flops - plain_flops == 2 * 8 * 16 * 16


def test_a_recompute_that_reads_a_skipped_output_raises():
    """A block whose recompute takes another path than its forward and reads
    an output the forward's path did not need: memfit raises, rather than
    saving what a placeholder holds. With the guard off the gradients are
    wrong, which is what the guard stands between."""
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(8, 16, requires_grad=True)
    mode = _saving(model, x, "add.Tensor")
    out = run(model, (x,), {}, policy=_rerun(mode))
    model.swap = True
    with pytest.raises(pruning.PruneError, match="another path"):
        out.square().sum().backward()


@pytest.mark.parametrize("filled", [True, False])
def test_a_forward_that_reads_memory_no_op_wrote_is_not_pruned(filled):
    """`torch.empty` may be filled by a kernel the dispatcher does not see:
    such a forward is recomputed in full; an `empty` that a seen op fills
    (dropout's mask on CPU, `copy_`) is fine."""

    class Empty(Residual):
        def forward(self, x):
            buf = torch.empty_like(x)
            if filled:
                buf.copy_(x)
            return super().forward(buf)

    torch.manual_seed(0)
    model, x = Empty(), torch.randn(8, 16, requires_grad=True)
    flow = pruning.Dataflow()

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func not in pruning.IGNORED:
                flow.add(func, args, kwargs or {}, out)
            return out

    with Record():
        model(x)
    assert (flow.opaque is None) if filled else "uninitialised" in flow.opaque
