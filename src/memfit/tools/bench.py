"""The memory/time frontier of a model: planned runs at a sweep of budgets
next to every uniform strategy, each measured."""

from __future__ import annotations

from memfit.core.measurement import measure
from memfit.errors import MemfitError
from memfit.planning.planner import plan
from memfit.planning.simulation import simulate

UNIFORM = ("none", "blocks", "every:2", "every:3", "sqrt", "selective", "scores", "pointwise")


def sweep(model, batch, loss_fn, budgets=(20, 30, 40, 50, 60, 70, 80, 90, 100), *, cost="time", blocks=None):
    """Rows with `strategy`, `budget_bytes`, `predicted_peak_bytes`,
    `peak_bytes`, `step_time_s`, `slowdown`, `recompute_flops` (extra FLOPs
    over the plain step, as a fraction), `feasible`. `budgets` are percentages
    of the plain run's peak."""
    rows = []
    measure(model, batch, loss_fn, "none", blocks=blocks, timed_steps=1)  # warm-up: the first run is slower

    def row(strategy, predicted, budget=None):
        m = measure(model, batch, loss_fn, strategy, blocks=blocks, timed_steps=3)
        return {
            "strategy": strategy if isinstance(strategy, str) else f"plan:{budget}%",
            "budget_bytes": None,
            "predicted_peak_bytes": predicted,
            "peak_bytes": m["peak_bytes"],
            "step_time_s": m["step_time_s"],
            "flops": m["flops"],
            "feasible": True,
            "memory_source": m["memory_source"],
        }

    for s in UNIFORM:
        rows.append(row(s, simulate(model, batch, loss_fn, s, blocks=blocks).peak_bytes))
    for pct in budgets:
        try:
            p = plan(model, batch, loss_fn, f"{pct}%", blocks=blocks, cost=cost)
        except MemfitError as e:
            rows.append(
                {
                    "strategy": f"plan:{pct}%",
                    "budget_bytes": None,
                    "predicted_peak_bytes": None,
                    "peak_bytes": None,
                    "step_time_s": None,
                    "flops": None,
                    "feasible": False,
                    "reason": str(e),
                }
            )
            continue
        r = row(p, p.predicted_peak_bytes, pct)
        r["budget_bytes"] = p.budget_bytes
        r["plan"] = [[b.name, str(b.mode)] for b in p.blocks]
        rows.append(r)
    base = rows[0]
    for r in rows:
        if r["feasible"]:
            r["slowdown"] = r["step_time_s"] / base["step_time_s"] - 1
            r["recompute_flops"] = r["flops"] / base["flops"] - 1
        else:
            r["slowdown"] = r["recompute_flops"] = None
    return rows
