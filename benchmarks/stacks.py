"""Models with several stacks, at batches where activations outweigh the
weights: memfit's `blocks` against the model's own gradient checkpointing, and
one plan for 60% of the plain peak across every stack.

    python benchmarks/stacks.py [--batch 32] [--out benchmarks/results]

For each model of tests/real_models.py STACKS (tiny random-weight configs,
nothing downloaded), on CPU, with the storage tracker:
  chains      chains found (blocks in all), and the coverage
  blocks      peak saved by `blocks`; gradients bitwise equal to the plain run's
  own         peak saved by the model's own gradient checkpointing, where it has one
  plan 60%    a plan for 60% of the plain peak: measured saving, predicted against
              measured peak, and whether its gradients are bitwise equal
"""

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import real_models
from test_real_models import grads, measured_peak

import memfit
from memfit.planning.profiling import coverage
from memfit.tools.report import write_json


def own_peak(model, batch, loss_fn):
    """benchmarks/real_models.py's (that file's name is taken by tests/real_models.py on the path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_models_bench", Path(__file__).with_name("real_models.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.own_peak(model, batch, loss_fn)


def exact(model, batch, loss_fn, strategy, plain):
    loss, g, b = grads(model, batch, loss_fn, strategy)
    return (
        torch.equal(loss, plain[0])
        and g.keys() == plain[1].keys()
        and all(torch.equal(g[n], plain[1][n]) for n in g)
        and all(torch.equal(x, y) for x, y in zip(b, plain[2]))
    )


def row(name, model, batch, loss_fn):
    plain = grads(model, batch, loss_fn, "none")
    none, blocks = measured_peak(model, batch, loss_fn, "none"), measured_peak(model, batch, loss_fn, "blocks")
    own = own_peak(model, batch, loss_fn)
    out = {
        "model": name,
        "chains": len(memfit.find_chains(model)),
        "blocks_found": len(memfit.find_blocks(model)),
        "coverage": coverage(model, batch, loss_fn),
        "plain_peak_bytes": none,
        "blocks_saving": 1 - blocks / none,
        "blocks_exact": exact(model, batch, loss_fn, "blocks", plain),
        "own_checkpointing_saving": None if own is None else 1 - own / none,
    }
    try:
        plan = memfit.plan(model, batch, loss_fn, "60%", cost="flops")
    except memfit.MemfitError as e:  # the weights and optimizer state alone take more than 60%
        return {**out, "plan_unreachable": str(e)}
    measured = measured_peak(model, batch, loss_fn, plan)
    return {
        **out,
        "plan_budget_bytes": plan.budget_bytes,
        "plan_predicted_bytes": plan.predicted_peak_bytes,
        "plan_measured_bytes": measured,
        "plan_saving": 1 - measured / none,
        "plan_error": plan.predicted_peak_bytes / measured - 1,
        "plan_exact": exact(model, batch, loss_fn, plan, plain),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    real_models.B = args.batch
    rows = []
    for name, build in real_models.STACKS.items():
        torch.manual_seed(0)
        rows.append(row(name, *build()))
    table = Table(title=f"several stacks, batch {args.batch} (CPU)")
    for col in (
        "model",
        "chains (blocks)",
        "coverage",
        "blocks",
        "own",
        "plan at 60%",
        "predicted vs measured",
        "exact",
    ):
        table.add_column(col)
    for r in rows:
        own, fits = r["own_checkpointing_saving"], "plan_saving" in r
        table.add_row(
            r["model"],
            f"{r['chains']} ({r['blocks_found']})",
            f"{r['coverage']:.0%}",
            f"-{r['blocks_saving']:.1%}",
            "-" if own is None else f"-{own:.1%}",
            f"-{r['plan_saving']:.1%}" if fits else "out of reach",
            f"{r['plan_error']:+.2%}" if fits else "-",
            "yes" if r["blocks_exact"] and r.get("plan_exact", True) else "NO",
        )
    Console().print(table)
    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"stacks-cpu-{date}.json"
    write_json(
        path,
        {
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "date": date,
            "torch": torch.__version__,
            "batch": args.batch,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
