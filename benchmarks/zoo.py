"""memfit on the model zoos: torchvision and timm models built with their
own constructors (tests/zoo.py): the chains found, the peak `blocks` saves
against the model's own checkpointing (timm's `set_grad_checkpointing(True)`,
torchvision DenseNet's `memory_efficient=True`), and a plan's predicted peak
against the measured one (for the budget halfway between the plain and
`blocks` peaks). That every strategy gives the plain step's gradients is
tests/test_zoo.py's job; it is not repeated here.

torchvision and timm need a torch other than the one the README pins, in a
virtual environment of their own (README, "The model zoos"):

    python -m venv .zoo && .zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 -e ".[zoo]"
    .zoo/bin/python benchmarks/zoo.py [--only NAME ...] [--out benchmarks/results]
"""

import argparse
import datetime
import importlib.util
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import memfit
from memfit.core.memory import fmt_bytes
from memfit.planning.simulation import blocks_of
from memfit.tools.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import zoo

# the measurements of benchmarks/real_models.py (its name is taken by tests/real_models.py on the path)
_spec = importlib.util.spec_from_file_location("bench_real_models", Path(__file__).resolve().parent / "real_models.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def row(name, model, batch, loss_fn):
    chains = memfit.find_chains(model, blocks_of(model, batch, loss_fn))  # RAFT: each call of its update block
    none, blocks = (
        bench.measured_peak(model, batch, loss_fn, "none"),
        bench.measured_peak(model, batch, loss_fn, "blocks"),
    )
    own = bench.own_peak(model, batch, loss_fn, zoo.own_checkpointing)
    plan = memfit.plan(
        model, batch, loss_fn, (none + blocks) // 2 if blocks < 0.98 * none else int(none * 1.01), cost="flops"
    )
    measured = bench.measured_peak(model, batch, loss_fn, plan)
    return {
        "model": name,
        "chains": [f"{c[0][0]}..{c[-1][0]} ({len(c)})" for c in chains],
        "blocks_found": sum(len(c) for c in chains),
        "coverage": plan.coverage,
        "plain_peak_bytes": none,
        "blocks_saving": 1 - blocks / none,
        "own_checkpointing_saving": None if own is None else 1 - own / none,
        "plan_predicted_bytes": plan.predicted_peak_bytes,
        "plan_measured_bytes": measured,
        "plan_error": plan.predicted_peak_bytes / measured - 1,
        "plain_error": plan.baseline_peak_bytes / none - 1,
        "memory_source": plan.sources["memory"],
    }


def render(rows):
    table = Table(title=f"memfit on the model zoos (CPU, torch {torch.__version__})")
    for col in (
        "model",
        "chains (blocks)",
        "coverage",
        "plain peak",
        "blocks",
        "own",
        "plan predicted vs measured",
        "plain predicted vs measured",
        "memory from",
    ):
        table.add_column(col)
    for r in rows:
        own = r["own_checkpointing_saving"]
        table.add_row(
            r["model"],
            f"{len(r['chains'])} ({r['blocks_found']})",
            f"{r['coverage']:.0%}",
            fmt_bytes(r["plain_peak_bytes"]),
            f"-{r['blocks_saving']:.1%}",
            "-" if own is None else f"-{own:.1%}",
            f"{r['plan_error']:+.2%}",
            f"{r['plain_error']:+.2%}",
            r["memory_source"].split(":")[0],
        )
    Console().print(table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="models whose names contain one of these")
    ap.add_argument("--batch", type=int, default=8, help="batch size (the tests use 2)")
    ap.add_argument("--scale", type=int, default=2, help="images this many times the tests' side (32 -> 64)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    zoo.B, zoo.SCALE = args.batch, args.scale
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, build in zoo.ZOO.items():
        if args.only and not any(o in name for o in args.only):
            continue
        torch.manual_seed(0)
        rows.append(row(name, *build()))
        print(f"{name}: done", flush=True)
    render(rows)
    import timm
    import torchvision

    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"zoo-cpu-{date}.json"
    write_json(
        path,
        {
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "date": date,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "batch": args.batch,
            "scale": args.scale,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
