"""memfit.tools.bench: the frontier, each row measured, the plans within their budgets."""

from memfit import models
from memfit.tools.bench import UNIFORM, sweep


def test_the_frontier_measures_every_row_and_each_plan_fits():
    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=8)
    rows = sweep(model, batch, loss_fn, (85, 100, 1), cost="flops")
    assert [r["strategy"] for r in rows] == [*UNIFORM, "plan:85%", "plan:100%", "plan:1%"]
    base = rows[0]
    assert base["slowdown"] == 0 and base["recompute_flops"] == 0
    for r in rows[:-1]:
        assert r["feasible"] and r["peak_bytes"] == r["predicted_peak_bytes"], r["strategy"]
        assert r["step_time_s"] > 0
    for r in rows[len(UNIFORM) : -1]:
        assert r["peak_bytes"] <= r["budget_bytes"] and len(r["plan"]) == 4
    assert rows[-1]["feasible"] is False and "below the smallest peak" in rows[-1]["reason"]
    assert rows[len(UNIFORM) + 1]["recompute_flops"] == 0  # at 100% nothing needs recomputing
