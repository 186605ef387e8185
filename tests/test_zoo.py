"""The model zoos (tests/zoo.py): torchvision and timm models as their users
build them. Every strategy trains exactly like the plain model, bitwise, and
a plan fits its budget with its predicted peak within 1% of the measured one.

torchvision and timm need a torch other than the one the README pins, so
these tests skip without them; the README's "The model zoos" gives the
command that runs them in a virtual environment of their own."""

import pytest
import torch
from test_real_models import (
    measured_peak,
    test_every_strategy_gives_the_plain_gradients,  # noqa: F401 - run on this file's `built`
)
from zoo import TIMM, TORCHVISION, ZOO

import memfit


@pytest.fixture(scope="module", params=list(ZOO))
def built(request):
    pytest.importorskip("timm" if request.param in TIMM else "torchvision")
    torch.manual_seed(0)
    return request.param, *ZOO[request.param]()


def test_the_zoo_spans_the_families():
    assert len(TORCHVISION) >= 8 and len(TIMM) >= 12


def test_a_plan_fits_and_predicts_the_peak(built):
    """For the budget halfway between the plain and `blocks` peaks (1% above the plain peak where parameters and
    optimizer state make the peak at this tiny size)."""
    name, model, batch, loss_fn = built
    none, blocks = measured_peak(model, batch, loss_fn, "none"), measured_peak(model, batch, loss_fn, "blocks")
    plan = memfit.plan(
        model, batch, loss_fn, (none + blocks) // 2 if blocks < 0.98 * none else int(none * 1.01), cost="flops"
    )
    measured = measured_peak(model, batch, loss_fn, plan)
    assert measured <= plan.budget_bytes, name
    assert abs(plan.predicted_peak_bytes / measured - 1) <= 0.01, (name, plan.predicted_peak_bytes, measured)


def test_what_blocks_keeps_beyond_timms_own_on_efficientnet_is_the_batchnorm_replay():
    """timm's EfficientNet-B0 is the one zoo model where memfit `blocks` keeps more than the model's own
    checkpointing: the BatchNorm state it keeps to write the running statistics once (NOTE [state replay]).
    Without it (`state_replay=False`) the peak is timm's own to the byte, and so are timm's running statistics,
    written twice; with it they are the plain step's."""
    pytest.importorskip("timm")
    import copy

    torch.manual_seed(0)
    model, batch, loss_fn = TIMM["timm efficientnet_b0 (SE, in-place SiLU)"]()
    own = copy.deepcopy(model)
    own.set_grad_checkpointing(True)
    ours, theirs = measured_peak(model, batch, loss_fn, "blocks"), measured_peak(own, batch, loss_fn, "none")
    assert (
        measured_peak(model, batch, loss_fn, "blocks", state_replay=False) == theirs <= ours
    )  # < at the benchmark size

    def buffers_after(m):
        m.train()
        torch.manual_seed(0)
        loss_fn(m, batch).backward()
        return list(m.buffers())

    plain = buffers_after(copy.deepcopy(model))
    assert all(torch.equal(a, b) for a, b in zip(plain, buffers_after(memfit.apply(copy.deepcopy(model), "blocks"))))
    for m in (own, memfit.apply(copy.deepcopy(model), "blocks", state_replay=False)):
        assert not all(torch.equal(a, b) for a, b in zip(plain, buffers_after(m)))
