"""memfit.planning.profiling: simulated steps against real ones, and profiling that leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import models
from memfit.core.measurement import measure
from memfit.core.strategies import Unit
from memfit.planning.simulation import simulate


@pytest.mark.parametrize("name", ["gpt", "resnet-se"])
def test_a_simulated_step_peaks_where_the_real_one_does(name):
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=4)
    for strategy in ("none", "blocks", "selective", "sqrt"):
        assert (
            simulate(model, batch, loss_fn, strategy).peak_bytes
            == measure(model, batch, loss_fn, strategy, timed_steps=0, flops=False)["peak_bytes"]
        ), strategy


class Tower(nn.Module):
    def __init__(self, n=4, width=32):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(n)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class Distill(nn.Module):
    """A student trained against a frozen teacher run under no_grad (EMA targets, distillation): the teacher's
    blocks are found as a chain, but have no backward."""

    def __init__(self):
        super().__init__()
        self.student = Tower()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
        return nn.functional.mse_loss(self.student(x), target)


def test_blocks_without_a_backward_are_planned_and_predicted_exactly():
    torch.manual_seed(0)
    model, batch = Distill(), torch.randn(512, 32)
    loss_fn = lambda m, b: m(b)  # noqa: E731
    assert len(memfit.find_blocks(model)) == 8
    for budget in ("80%", "60%"):
        p = memfit.plan(model, batch, loss_fn, budget, cost="flops")
        assert {str(b.mode) for b in p.blocks if b.name.startswith("teacher")} == {"keep"}
        assert [b.name for b in p.blocks] == [n for n, _ in memfit.find_blocks(model)]
        assert measure(model, batch, loss_fn, p, timed_steps=0, flops=False)["peak_bytes"] == p.predicted_peak_bytes


@pytest.mark.parametrize("name, real", [("gpt", False), ("resnet-se", False), ("hf:llama", True)])
def test_the_ops_recorded_are_the_ones_a_policy_numbers(name, real, monkeypatch):
    """NOTE [op-level modes]: `ops:K` names the K-th op the selective-checkpoint
    mode shows the policy; the profile's record of each block must count the
    same ops in the same order (BatchNorm's buffers included: memfit's state
    snapshot must not show the policy its copies). transformers' Llama takes
    another path on fake tensors (NOTE [real steps]): its real step is recorded."""
    from memfit.core import strategies
    from memfit.planning.frontier import record_ops

    model, batch, loss_fn = models.load(name, size="tiny", batch_size=4)
    recorded = record_ops(model, batch, loss_fn, real=real, seed=0).blocks
    seen, policy = [], strategies.policy

    def spying(mode):  # every op the policy numbers in the forward
        make = policy(mode)

        def fresh():
            fn = make()

            def spy(ctx, op, *args, **kwargs):
                if not ctx.is_recompute and op not in strategies.UNNUMBERED:
                    seen.append(strategies.op_name(op))
                return fn(ctx, op, *args, **kwargs)

            spy.decisions = fn.decisions
            return spy

        return fresh

    monkeypatch.setattr(strategies, "policy", spying)
    n = len(memfit.find_blocks(model))
    memfit.apply(model, [Unit(i, i + 1, "ops:mm@0") for i in range(n)])
    loss_fn(model, batch).backward()
    assert seen == [op.name for ops in recorded for op in ops]


def _ops(sizes):
    from memfit.planning.frontier import Op

    return [Op("mm", f, 0, 0, b, False, frozenset()) for b, f in sizes]


def _flow(n, last=None):
    """The dataflow of `n` independent ops, each saved by autograd: nothing to prune."""
    from types import SimpleNamespace

    from memfit.core.pruning import FRESH, Flow

    return SimpleNamespace(
        ops=[Flow("mm", (), FRESH)] * n, roots=set(range(n)), opaque=None, last=n - 1 if last is None else last
    )


def test_the_frontier_points_are_pareto_optimal():
    """Against every subset: no choice of outputs to save costs no more bytes
    and avoids more recompute than a point of the frontier."""
    import itertools

    from memfit.planning.frontier import frontier, saved_by

    sizes = [(3, 40), (5, 90), (2, 10), (7, 70), (4, 55), (1, 3), (6, 20), (2, 33)]
    ops = _ops(sizes)
    modes = frontier(ops, _flow(len(ops)), "flops")
    assert modes and all(set(m.saved_ops.values()) == {"mm"} for m in modes)
    subsets = [
        (sum(sizes[k][0] for k in c), sum(sizes[k][1] for k in c))
        for r in range(len(sizes) + 1)
        for c in itertools.combinations(range(len(sizes)), r)
    ]
    for m in modes:
        saved = saved_by(m, ops)
        b, avoided = sum(sizes[k][0] for k in saved), sum(sizes[k][1] for k in saved)
        assert not [s for s in subsets if s[0] <= b and s[1] > avoided], m


def test_random_and_in_place_written_outputs_are_never_saved():
    from dataclasses import replace

    from memfit.planning.frontier import frontier

    ops = _ops([(3, 40), (5, 90), (2, 10)])
    ops[1] = replace(ops[1], random=True)
    ops[2] = replace(ops[2], saveable=False)
    assert {k for m in frontier(ops, _flow(3), "flops") for k in m.saved_ops} == {0}
    assert [str(m) for m in frontier(ops, _flow(3, 0), "flops")] == ["ops:mm@0"] and frontier(
        _ops([(3, 40)]), _flow(1, -1), "flops"
    ) == []


def test_the_peak_model_of_op_level_points_is_what_a_simulation_reads():
    """NOTE [op-level frontier]: the profile prices its op-level points from
    `recompute`'s terms instead of simulating them; on GPT blocks what a point
    keeps is the simulation's reading to the byte, and the rise of its
    backward and inside its forward are no lower than the simulation's."""
    from memfit.planning.profiling import _read, profile

    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=4)
    prof = profile(model, batch, loss_fn, cost="flops")
    n = len(prof.names)
    for label in list(prof.points)[::4]:
        units = [Unit(i, i + 1, prof.mode(label, i)) for i in range(n)]
        got = _read(
            simulate(
                model, batch, loss_fn, units, marks=True, real=prof.memory_source.startswith("measured"), seed=prof.seed
            ),
            n,
        )
        assert got["kept"] == prof.kept[label], label
        assert all(w <= e for w, e in zip(got["work"], prof.work[label])), label
        assert all(t <= e for t, e in zip(got["transient"], prof.transient[label])), label


def test_the_frontier_sees_what_saving_an_op_spares_before_it():
    """NOTE [op-level frontier] with the pruned recompute: saving a cheap sum
    that is all a costly matmul feeds spares the matmul too, so for the same
    bytes the frontier saves the sum, not the matmul (a knapsack of
    independent items would save the matmul and recompute the sum)."""
    from types import SimpleNamespace

    from memfit.core.pruning import FRESH, Flow
    from memfit.planning.frontier import Op, frontier

    ops = [Op("mm", 100, 0, 0, 10, False, frozenset()), Op("add.Tensor", 0, 1, 0, 10, False, frozenset())]
    flow = SimpleNamespace(ops=[Flow("mm", (), FRESH), Flow("add.Tensor", (0,), FRESH)], roots={1}, last=1, opaque=None)
    assert str(frontier(ops, flow, "flops")[0]) == "ops:add.Tensor@1"


class _UnusedHead(torch.nn.Module):
    """A model with a trainable head its loss never reaches: a real step gives it no gradient and no optimizer state."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(3)]
        )
        self.head = torch.nn.Linear(16, 64)

    def forward(self, x):
        return self.blocks(x)


def test_a_parameter_the_step_never_reaches_has_no_optimizer_state_in_the_simulation():
    from memfit.core.measurement import measure

    model, batch = _UnusedHead(), torch.randn(8, 16)
    loss = lambda m, b: m(b).square().mean()  # noqa: E731
    for strategy in ("none", "blocks"):
        assert (
            simulate(model, batch, loss, strategy).peak_bytes
            == measure(model, batch, loss, strategy, timed_steps=0)["peak_bytes"]
        )
