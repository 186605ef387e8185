"""Per-rank memory of a run at the world sizes asked, before the cluster is rented: no checkpointing, the
presets and a plan, each simulated for one rank with FSDP2 itself (NOTE [one rank simulated] in
memfit.planning.sharding). `memfit plan --distributed fsdp --world-size 8,128 ...` prints these rows."""

from __future__ import annotations

from memfit.core.schedule import Budget
from memfit.planning.planner import plan_or_none
from memfit.planning.sharding import Layout
from memfit.planning.simulation import simulate

__all__ = ["COMPARED", "cluster_rows"]

COMPARED = ("none", "blocks", "selective")


def _row(layout: Layout, strategy: str, peak: int | None, static: int | None, budget: int, parts: dict) -> dict:
    return {
        **{f"{name}_bytes": n for name, n in parts.items()},
        "world_size": layout.world_size,
        "tp": layout.tp,
        "dp": layout.dp,
        "layout": str(layout),
        "strategy": strategy,
        "predicted_peak_bytes": peak,
        "static_bytes": static,  # parameter shards, optimizer state and the batch
        "budget_bytes": budget,
        "fits": peak is not None and peak <= budget,
    }


def cluster_rows(model, batch, loss_fn, budget, layouts: list[Layout], *, blocks=None, cost="flops") -> list[dict]:
    """For each layout: one rank's simulated peak with each of `COMPARED`, and the plan for `budget` (its
    peak None where none fits). `batch` is one data-parallel rank's share; '60%' budgets are of each layout's
    plain rank."""
    budget = Budget.parse(budget)
    rows = []
    for layout in layouts:
        for strategy in COMPARED:
            sim = simulate(model, batch, loss_fn, strategy, blocks=blocks, distributed=layout)
            if strategy == "none":
                budget_bytes = budget.bytes(sim.peak_bytes)
            rows.append(_row(layout, strategy, sim.peak_bytes, sim.static_bytes, budget_bytes, sim.parts))
        p = plan_or_none(model, batch, loss_fn, budget_bytes, blocks=blocks, cost=cost, distributed=layout)
        peak, parts = None, {}
        if p is not None:  # the plan's rank simulated once more for its parts (its peak is the plan's)
            sim = simulate(model, batch, loss_fn, p, blocks=blocks, distributed=layout)
            peak, parts = p.predicted_peak_bytes, sim.parts
        row = _row(layout, "plan", peak, rows[-1]["static_bytes"], budget_bytes, parts)
        if p is not None:
            row["plan"] = str(p)
            row["predicted_recompute_flops"] = p.predicted_recompute_flops
        rows.append(row)
    return rows
