"""NOTE [recompute on demand]: op-level modes recompute each tensor when backward unpacks it, exactly."""

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import models
from memfit.core.measurement import Run, steps
from memfit.core.strategies import RECOMPUTE, Mode, Unit
from memfit.planning.frontier import frontier, record_ops
from memfit.planning.profiling import Point, profile


def points(model, batch, loss_fn):
    """Every block's op-level frontier (NOTE [op-level frontier]), as `lazy:` modes."""
    rec = record_ops(model, batch, loss_fn, real=True, seed=0)
    return [[m.lazy() for m in frontier(ops, flow, "flops")] for ops, flow in zip(rec.blocks, rec.flows)]


def step(model, batch, loss_fn, units=None, seed=0):
    m = copy.deepcopy(model)
    if units is not None:
        memfit.apply(m, units)
    torch.manual_seed(seed)
    loss = loss_fn(m, batch)
    loss.backward()
    return loss.detach(), [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]


@pytest.mark.parametrize("name", ["resnet-se", "gpt"])
def test_every_point_gives_the_plain_gradients_and_buffers(name):
    """BatchNorm (whose kernel writes its running statistics without its schema
    saying so) and dropout (random: held, never replayed): every point of every
    block's frontier, bitwise the plain step's loss, gradients and buffers."""
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=8)
    per_block = points(model, batch, loss_fn)
    plain = step(model, batch, loss_fn)
    for j in range(max(map(len, per_block))):
        units = [Unit(i, i + 1, ms[min(j, len(ms) - 1)] if ms else "recompute") for i, ms in enumerate(per_block)]
        got = step(model, batch, loss_fn, units)
        assert torch.equal(got[0], plain[0]), j
        assert all(torch.equal(a, b) for a, b in zip(got[1], plain[1])), j
        assert all(torch.equal(a, b) for a, b in zip(got[2], plain[2])), j


def test_on_demand_peaks_below_the_rerun_of_the_same_mode():
    """Llama blocks under the op-level point that recomputes no matmul: recomputed
    on demand, the step peaks lower than torch's rerun of the block with the same
    policy (the tracker's measure), with the same FLOPs and losses."""
    model, batch, loss_fn = models.load("hf:llama", size="tiny", batch_size=16)
    prof = profile(model, batch, loss_fn, cost="flops")
    label = min(
        (x for x in prof.points if not x.on_demand and not any(prof.recomputed[x])), key=lambda x: sum(prof.kept[x])
    )
    runs = []
    for twin in (Mode.lazy, lambda m: m):
        m = memfit.apply(copy.deepcopy(model), [Unit(i, i + 1, twin(m)) for i, m in enumerate(prof.points[label])])
        runs.append(Run(m, torch.optim.AdamW(m.parameters())))
    steps(runs, batch, loss_fn, seed=1, timed=1)
    on_demand, rerun = runs
    assert on_demand.losses == rerun.losses
    assert on_demand.flops <= rerun.flops
    assert on_demand.mem.peak_bytes < 0.97 * rerun.mem.peak_bytes, (on_demand.mem.peak_bytes, rerun.mem.peak_bytes)


class Exp(nn.Module):
    """exp saves its output, which the on-demand replay makes again from the block's input (which
    nothing saves); the matmul's bf16 inputs under autocast are replayed casts."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 64).reshape(8, 8))

    def forward(self, x):
        return (torch.exp(x) @ self.w) * 2


class Chain(nn.Module):
    def __init__(self, after=None):
        super().__init__()
        self.blocks = nn.ModuleList([Exp(), Exp()])
        self.after = after

    def forward(self, x):
        h = self.blocks[0](x)
        if self.after:
            self.after(x)
        return self.blocks[1](h)


def _nothing_saved():
    """A lazy: mode for each block that names no op it runs: nothing is saved."""
    return [Unit(0, 1, "lazy:mul.Tensor@99"), Unit(1, 2, "lazy:mul.Tensor@99")]


def test_a_tensor_written_in_place_after_the_forward_read_it_raises():
    """The block's input is written in place after the block: plain autograd
    does not mind (exp saves only its output), but the replay would read the
    written values; it raises instead of giving wrong gradients."""
    x = torch.randn(4, 8, requires_grad=True)
    model = memfit.apply(Chain(after=lambda h: h.add_(1.0)), _nothing_saved())
    out = model(x.clone())
    with pytest.raises(RuntimeError, match="written in place"):
        out.sum().backward()


def test_double_backward_and_autocast_match_the_plain_step():
    """A gradient penalty (backward with create_graph=True differentiates the
    replayed tensors: autograd gives them their history back) under bf16
    autocast, backward included (the replay runs the recorded casts): the
    plain step's gradients, bitwise."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)

    def penalty(model):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # backward under autocast too
            y = model(xx)
            (g,) = torch.autograd.grad(y.float().sum(), xx, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xx)
        return gg

    plain = penalty(Chain())
    got = penalty(memfit.apply(Chain(), _nothing_saved()))
    assert torch.equal(plain, got)


class WritesItsInput(nn.Module):
    """exp's output is saved (for its backward) before the block writes its input, which exp read, in place."""

    def forward(self, x):
        y = torch.exp(x)
        x.mul_(2.0)
        return y * x


def test_a_write_inside_the_block_keeps_the_tensors_a_replay_would_read():
    """Plain autograd accepts this block (exp saves its output, not its input); a
    replay of exp after `mul_` would read the written input, so the handle keeps
    exp's output instead: the plain gradients, bitwise, and no error."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([WritesItsInput(), WritesItsInput()])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x * 1.0))

    (plain,) = torch.autograd.grad(Two()(x).sum(), x)
    (got,) = torch.autograd.grad(memfit.apply(Two(), _nothing_saved())(x).sum(), x)
    assert torch.equal(plain, got)


def test_a_point_whose_step_fails_leaves_lazy_modes_out_with_a_warning():
    """The profile simulates the `lazy:` points; where a step fails (a replay
    refused), they are left out, and it says so."""
    from memfit.planning.profiling import _each_point

    def simulated(units):
        raise RuntimeError("memfit: a tensor that recomputing on demand reads was written in place")

    with pytest.warns(UserWarning, match="recompute on demand left out"):
        terms = _each_point({Point(1, on_demand=True): [Mode.parse("lazy:mm@0")] * 2}, [[0, 1]], simulated)
    assert terms == {}


def _decisions(model, batch, loss_fn, units):
    """What each block's policy decided, op by op, in a step under `units`."""
    m = memfit.apply(copy.deepcopy(model), units)
    made = []
    for block in m.modules():
        if "_memfit" in block.__dict__:
            fresh = block._memfit.policy

            def spy(traced=False, fresh=fresh):
                made.append(fresh(traced))
                return made[-1]

            spy.on_demand = fresh.on_demand
            block._memfit.policy = spy
    torch.manual_seed(0)
    loss_fn(m, batch).backward()
    return [list(fn.decisions) for fn in made]


@pytest.mark.parametrize("name", ["gpt", "hf:llama"])
def test_a_lazy_mode_saves_the_ops_its_ops_twin_saves(name):
    """The recorder numbers the ops as torch's selective checkpoint does: the
    same decisions, op by op, for a mode and its twin (else a `lazy:` mode would
    save other ops than the profile priced)."""
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=8)
    middle = [ms[len(ms) // 2] if ms else RECOMPUTE for ms in points(model, batch, loss_fn)]
    twin = [Unit(i, i + 1, m) for i, m in enumerate(middle)]
    ops = [Unit(i, i + 1, Mode(m.kind, m.saved)) for i, m in enumerate(middle)]
    got, want = _decisions(model, batch, loss_fn, twin), _decisions(model, batch, loss_fn, ops)
    assert got == want and any(any(d) for d in got)
