"""memfit.planning.timemodel: the fit, and a calibration that leaves the training as it was."""

import torch

from memfit.planning.timemodel import TimeModel, _nonnegative_fit, calibrate


def test_the_fit_recovers_known_coefficients_and_drops_negative_ones():
    x = torch.tensor([[1e6, 1e4, 1.0], [1e7, 1e5, 1.0], [1e5, 1e6, 1.0], [0.0, 1e3, 1.0]], dtype=torch.float64)
    true = torch.tensor([2e-11, 3e-10, 5e-6], dtype=torch.float64)
    assert torch.allclose(_nonnegative_fit(x, x @ true), true, rtol=1e-6)
    y = x @ torch.tensor([2e-11, -3e-10, 5e-6], dtype=torch.float64)  # a negative per-byte cost is dropped
    c = _nonnegative_fit(x, y.clamp(min=1e-9))
    assert (c >= 0).all() and c[1] == 0


def test_calibrating_draws_no_random_numbers_and_gives_positive_costs():
    rng = torch.get_rng_state()
    model = calibrate("cpu", repeats=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.per_flop > 0 and model.per_op > 0 and model.spread >= 0 and model.error >= 0
    assert calibrate("cpu", repeats=3) is model  # once per process
    big, small = model.seconds(flops=2 * 512**3, moved=3 * 512 * 512 * 4), model.seconds(moved=4096)
    assert big > small > 0


def test_seconds_is_linear():
    m = TimeModel("cpu", per_flop=1e-11, per_byte=1e-10, per_op=1e-6, spread=0.0, error=0.0)
    assert m.seconds(1e9, 1e6, 3) == 1e9 * 1e-11 + 1e6 * 1e-10 + 3e-6
