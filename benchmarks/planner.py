"""Planner targets (issue 3), measured on this machine; prints a table and writes JSON.

    python benchmarks/planner.py [--out benchmarks/results] [--quick]

1. Prediction: measured peak within 5% of the predicted peak for every plan,
   on gpt, resnet-se and mlp.
2. Dominance: at every budget, the plan recomputes no more FLOPs than any
   uniform strategy whose measured peak fits the same budget.
3. GPT at half the plain run's activation memory: the plan recomputes at most
   10% of the step's FLOPs and at most 0.6x the cheapest fitting uniform strategy
   among those the issue lists (blocks, every:2, every:3, sqrt, selective).
   The ratio to memfit's own finer uniform modes (scores, pointwise) is
   reported next to it.
4. Planning (the DP, after profiling) takes under 2 s for 48 blocks on one core.
Costs are FLOPs (--cost flops) so the comparisons are deterministic.
"""

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import memfit
from memfit import models
from memfit.core.measurement import measure
from memfit.models import gpt
from memfit.planning.planner import solve
from memfit.planning.profiling import profile
from memfit.tools.bench import sweep
from memfit.tools.report import bench_table, plot_frontier, write_json

BUDGETS = (20, 30, 40, 50, 60, 70, 80, 90, 100)
ISSUE_UNIFORM = ("blocks", "every:2", "every:3", "sqrt", "selective")


def check_rows(rows):
    planned = [r for r in rows if r["strategy"].startswith("plan:") and r["feasible"]]
    uniform = [r for r in rows if not r["strategy"].startswith("plan:")]
    worst_error = max(abs(r["peak_bytes"] / r["predicted_peak_bytes"] - 1) for r in planned)
    dominated = []
    for p in planned:
        for u in uniform:
            if u["peak_bytes"] <= p["budget_bytes"] and u["recompute_flops"] < p["recompute_flops"] - 1e-9:
                dominated.append((p["strategy"], u["strategy"]))
    over_budget = [p["strategy"] for p in planned if p["peak_bytes"] > p["budget_bytes"]]
    return {
        "plans": len(planned),
        "worst_prediction_error": worst_error,
        "dominated_by": dominated,
        "over_budget": over_budget,
    }


def half_activation(model, batch, loss_fn):
    base = measure(model, batch, loss_fn, "none", timed_steps=0)
    budget = int(base["peak_bytes"] - 0.5 * base["activation_bytes"])
    p = memfit.plan(model, batch, loss_fn, budget, cost="flops")
    planned = measure(model, batch, loss_fn, p, timed_steps=0)
    fitting = {}
    for s in ISSUE_UNIFORM + ("scores", "pointwise"):
        m = measure(model, batch, loss_fn, s, timed_steps=0)
        if m["peak_bytes"] <= budget:
            fitting[s] = m["flops"] / base["flops"] - 1
    cost = planned["flops"] / base["flops"] - 1
    listed = [v for k, v in fitting.items() if k in ISSUE_UNIFORM]
    whole = [v for k, v in fitting.items() if k in ISSUE_UNIFORM[:-1]]
    return {
        "budget_bytes": budget,
        "plan_recompute_flops": cost,
        "plan_peak_bytes": planned["peak_bytes"],
        "plan_activation_bytes": planned["activation_bytes"],
        "baseline_activation_bytes": base["activation_bytes"],
        "uniform_fitting": fitting,
        "ratio_to_cheapest_uniform": cost / min(listed) if listed else None,
        "ratio_to_cheapest_whole_block_uniform": cost / min(whole) if whole else None,
        "ratio_to_cheapest_memfit_uniform": cost / min(fitting.values()) if fitting else None,
        "plan": [[b.name, str(b.mode)] for b in p.blocks],
    }


def planning_time(n_layer=48):
    cfg = gpt.GPTConfig(block_size=64, n_layer=n_layer, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    idx = torch.randint(cfg.vocab_size, (4, 65))
    batch = (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    prof = profile(model, batch, gpt.loss_fn, cost="flops")
    profiling = time.perf_counter() - t0
    budget = prof.baseline_peak_bytes * 0.5
    t0 = time.perf_counter()
    solution = solve(prof, budget, "flops")
    solving = time.perf_counter() - t0
    t0 = time.perf_counter()
    memfit.plan(model, batch, gpt.loss_fn, "50%", cost="flops")
    whole = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {
        "blocks": n_layer,
        "profile_s": profiling,
        "solve_s": solving,
        "feasible": solution is not None,
        "plan_including_profile_and_simulated_check_s": whole,
        "threads": 1,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny models, fewer budgets (a smoke run)")
    args = ap.parse_args()
    out = Console()
    size = {"gpt": "tiny", "resnet-se": "tiny", "mlp": "tiny"} if args.quick else {}
    budgets = (40, 70, 100) if args.quick else BUDGETS
    date = datetime.date.today().isoformat()
    results = {
        "date": date,
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cost": "flops",
        "models": {},
    }
    summary = Table(title="planner targets (CPU, FLOP cost)")
    for col in ("model", "plans", "worst |measured/predicted - 1|", "over budget", "dominated"):
        summary.add_column(col)
    for name in ("gpt", "resnet-se", "mlp"):
        model, batch, loss_fn = models.load(name, size.get(name))
        rows = sweep(model, batch, loss_fn, budgets, cost="flops")
        out.print(bench_table(rows))
        checks = check_rows(rows)
        results["models"][name] = {"size": size.get(name) or "default", "rows": rows, "checks": checks}
        summary.add_row(
            name,
            str(checks["plans"]),
            f"{checks['worst_prediction_error']:.3%}",
            str(checks["over_budget"] or "none"),
            str(checks["dominated_by"] or "none"),
        )
        if name == "gpt":
            plot_frontier(rows, Path(args.out) / f"planner-frontier-gpt-cpu-{date}.png", title=f"gpt on CPU ({date})")
            results["gpt_half_activation"] = half_activation(model, batch, loss_fn)
    results["planning_time"] = planning_time()
    out.print(summary)
    h, t = results["gpt_half_activation"], results["planning_time"]
    checks = [m["checks"] for m in results["models"].values()]
    targets = {
        "prediction within 5% for every plan": all(c["worst_prediction_error"] <= 0.05 for c in checks),
        "no plan over its budget": not any(c["over_budget"] for c in checks),
        "no plan beaten by a fitting uniform strategy": not any(c["dominated_by"] for c in checks),
        "gpt, half activations: plan <= 10% of step FLOPs": h["plan_recompute_flops"] <= 0.10,
        "gpt, half activations: plan <= 0.6x cheapest fitting uniform": (h["ratio_to_cheapest_uniform"] or 0) <= 0.6,
        "48 blocks: solve under 2 s on one core": t["solve_s"] < 2,
    }
    results["targets"] = targets
    out.print(
        f"gpt at half the activation memory (budget {h['budget_bytes'] / 2**20:.1f} MiB): plan recomputes "
        f"{h['plan_recompute_flops']:.1%} of the step's FLOPs; fitting uniform strategies: "
        + ", ".join(f"{k} {v:.1%}" for k, v in h["uniform_fitting"].items())
        + f"; ratio to the cheapest of {', '.join(ISSUE_UNIFORM)}: {h['ratio_to_cheapest_uniform']:.2f}, "
        f"to the cheapest whole-block one {h['ratio_to_cheapest_whole_block_uniform'] or float('nan'):.2f}, "
        f"to the cheapest of every memfit uniform strategy {h['ratio_to_cheapest_memfit_uniform']:.2f}"
    )
    out.print(
        f"48 blocks, one core: solve {t['solve_s']:.2f} s after a {t['profile_s']:.1f} s profile; "
        f"plan() with profile and simulated check {t['plan_including_profile_and_simulated_check_s']:.1f} s"
    )
    for name, ok in targets.items():
        out.print(f"  {'met' if ok else 'NOT MET'}: {name}")
    path = Path(args.out) / f"planner-cpu-{date}.json"
    write_json(path, results)
    out.print(f"written to {path}")


if __name__ == "__main__":
    main()
