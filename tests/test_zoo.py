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
    plan = memfit.plan(model, batch, loss_fn, (none + blocks) // 2 if blocks < 0.98 * none else int(none * 1.01),
                       cost="flops")
    measured = measured_peak(model, batch, loss_fn, plan)
    assert measured <= plan.budget_bytes, name
    assert abs(plan.predicted_peak_bytes / measured - 1) <= 0.01, (name, plan.predicted_peak_bytes, measured)
