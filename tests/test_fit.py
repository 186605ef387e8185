"""memfit.planning.fit: the largest batch that fits a budget, with each strategy, as a real step measures it."""

import copy
import json

import pytest
import torch

import memfit
from memfit import models
from memfit.cli import main
from memfit.core.memory import track_memory
from memfit.planning.fit import largest_batch


def test_fit_finds_the_largest_batch_that_fits():
    """At the batch `fit` reports a real step fits the budget; one sample more does not."""
    model, _, loss_fn = models.load("resnet-se", "tiny")
    make = lambda b: models.resnet_se.batch("tiny", b)  # noqa: E731
    budget = 24 * 2**20
    sizes = {}
    for strategy in ("none", "blocks"):
        size, _ = largest_batch(model, make, loss_fn, strategy, budget)
        sizes[strategy] = size
        for b, fits in ((size, True), (size + 1, False)):
            m = memfit.apply(copy.deepcopy(model), strategy)
            opt = torch.optim.AdamW(m.parameters())
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            batch = make(b)
            with track_memory(m, opt, batch) as mem:
                loss_fn(m, batch).backward()
                opt.step()
            assert (mem.peak_bytes <= budget) == fits, (strategy, b, mem.peak_bytes)
    assert sizes["blocks"] > sizes["none"]


@pytest.mark.slow
def test_cli_fit(tmp_path, cli):
    path = tmp_path / "fit.json"
    r = cli(
        "fit",
        "--model",
        "resnet-se",
        "--size",
        "tiny",
        "--budget",
        "32MiB",
        "--strategies",
        "none,blocks",
        "--json",
        str(path),
    )
    assert r.returncode == 0, r.stderr
    rows = {row["strategy"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["blocks"]["batch_size"] > rows["none"]["batch_size"] > 0
    assert {"strategy", "batch_size", "peak_bytes", "time_per_sample_s"} <= set(rows["none"])
    r = cli("fit", "--model", "resnet-se", "--budget", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_fit_budget_auto_is_the_free_memory_of_the_device_used(monkeypatch, capsys):
    """`fit --budget auto` asks the device the model runs on (it read the host's memory for --device cuda)."""
    import memfit.cli
    import memfit.planning.fit
    from memfit.core import schedule

    asked, budgets = [], []
    model, _, loss_fn = memfit.models.load("mlp", size="tiny")[:3]
    monkeypatch.setattr(memfit.cli, "_load", lambda args: (torch.device("cuda"), model, None, loss_fn))
    monkeypatch.setattr(schedule, "available_bytes", lambda device: asked.append(torch.device(device).type) or 2**30)
    monkeypatch.setattr(
        memfit.planning.fit,
        "fit",
        lambda m, mb, lf, budget, *a, **k: (
            budgets.append(budget)
            or [
                {
                    "strategy": "none",
                    "batch_size": 4,
                    "peak_bytes": 100,
                    "time_per_sample_s": None,
                    "memory_source": "-",
                }
            ]
        ),
    )
    assert main(["fit", "--model", "mlp", "--size", "tiny", "--budget", "auto", "--strategies", "none"]) == 0
    assert asked[-1] == "cuda" and budgets == [2**30]
    assert "largest batch in 1.0 GiB: mlp on cuda" in capsys.readouterr().out


def test_fit_with_a_plan_finds_a_batch_at_least_as_large_as_without_checkpointing():
    """The `plan` row: at the batch it reports, a plan made for the budget fits it when measured; one sample more
    has no plan that fits; and no checkpointing fits no more."""
    from memfit.core.measurement import measure

    model, _, loss_fn = models.load("mlp", "tiny")
    make = lambda b: models.mlp.batch("tiny", b)  # noqa: E731
    budget = 2**20
    none, _ = largest_batch(model, make, loss_fn, "none", budget)
    size, peak = largest_batch(model, make, loss_fn, "plan", budget, at_least=none)  # `fit` starts there too
    assert size > none > 0
    p = memfit.plan(model, make(size), loss_fn, budget, cost="flops")
    assert measure(model, make(size), loss_fn, p, timed_steps=0)["peak_bytes"] == p.predicted_peak_bytes == peak
    with pytest.raises(memfit.MemfitError, match="below the smallest peak"):
        memfit.plan(model, make(size + 1), loss_fn, budget, cost="flops")


def test_the_plan_row_checks_the_simulation_against_a_real_step_once(monkeypatch):
    """The `plan` row plans at each batch size it tries; the simulated step is checked against a real step at
    the first batch only, and trusted at the larger ones (a real step at a batch of thousands costs minutes)."""
    from memfit.planning import profiling

    source, seen = profiling._source, []

    def spy(model, batch, loss_fn, n, checked=False, **kw):
        seen.append(checked)
        return source(model, batch, loss_fn, n, checked, **kw)

    monkeypatch.setattr(profiling, "_source", spy)
    model, _, loss_fn = models.load("mlp", "tiny")
    size, _ = largest_batch(model, lambda b: models.mlp.batch("tiny", b), loss_fn, "plan", 2**20)
    assert size > 1 and len(seen) > 2 and seen[0] is False and all(seen[1:]), seen
