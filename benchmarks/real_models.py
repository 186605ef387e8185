"""memfit on real architectures (tests/real_models.py): what it finds, whether
every strategy trains exactly like the plain model, and how close a plan's
predicted peak is to the measured one.

    python benchmarks/real_models.py [--out benchmarks/results]

For each model (tiny random-weight configs from transformers, diffusers and
peft, and a plain-torch LayerDrop encoder; nothing downloaded), on CPU:
  chains       the chains of blocks memfit finds, and how many blocks in all
  coverage     share of the plain step's saved activations inside the blocks
  exact        strategies whose gradients, loss and buffers are bitwise equal
               to the plain run's, of blocks, sqrt, every:2, selective, scores, pointwise
  blocks       peak saved by `blocks`
  own          peak saved by the model's own gradient checkpointing, where it has one
  60%          a plan for 60% of the plain peak: its measured saving, or the smallest
               budget it can reach where 60% is below it (tiny configs: parameters and
               optimizer state dominate)
  plan         a plan for the budget halfway between the plain and `blocks`
               peaks (1% above the plain peak where the optimizer step makes it): predicted peak against the
               tracker's measured one, in a
               step where every block ran (LayerDrop skips some in others)
  memory from  where the plan's numbers came from (simulated, or real steps and why)
"""

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from real_models import BUILDERS, MORE, STACKS
from test_real_models import STRATEGIES, grads, measured_peak

import memfit
from memfit.tools.report import write_json


def own_checkpointing(m):
    """Turn on a transformers or diffusers model's own gradient checkpointing; False if it has none."""
    try:
        if hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except (AttributeError, ValueError):
        return False
    return True


def own_peak(model, batch, loss_fn, turn_on=own_checkpointing):
    """The measured peak with the model's own gradient checkpointing, or None if it has none."""
    m = copy.deepcopy(model)
    return measured_peak(m, batch, loss_fn, "none") if turn_on(m) else None


def row(name, model, batch, loss_fn, turn_on=own_checkpointing):
    chains = memfit.find_chains(model)
    loss, plain, buffers = grads(model, batch, loss_fn, "none")
    exact = []
    for s in STRATEGIES:
        loss_s, g, b = grads(model, batch, loss_fn, s)
        if (
            torch.equal(loss, loss_s)
            and g.keys() == plain.keys()
            and all(torch.equal(plain[n], g[n]) for n in g)
            and all(torch.equal(x, y) for x, y in zip(buffers, b))
        ):
            exact.append(s)
    none, blocks = measured_peak(model, batch, loss_fn, "none"), measured_peak(model, batch, loss_fn, "blocks")
    own = own_peak(model, batch, loss_fn, turn_on)
    # halfway between the plain and `blocks` peaks; 1% above the plain one where the optimizer step makes the peak
    plan = memfit.plan(
        model, batch, loss_fn, (none + blocks) // 2 if blocks < 0.98 * none else int(none * 1.01), cost="flops"
    )
    measured = measured_peak(model, batch, loss_fn, plan)
    try:
        at60 = 1 - measured_peak(model, batch, loss_fn, memfit.plan(model, batch, loss_fn, "60%", cost="flops")) / none
    except memfit.MemfitError as e:
        at60 = str(e).split("reaches for this model and batch, ")[-1].split(" (plain")[0]
    return {
        "model": name,
        "chains": [f"{c[0][0]}..{c[-1][0]} ({len(c)})" for c in chains],
        "blocks_found": sum(len(c) for c in chains),
        "coverage": plan.coverage,
        "exact": exact,
        "plain_peak_bytes": none,
        "blocks_saving": 1 - blocks / none,
        "own_checkpointing_saving": None if own is None else 1 - own / none,
        "plan_60_saving": at60,
        "plan_predicted_bytes": plan.predicted_peak_bytes,
        "plan_measured_bytes": measured,
        "plan_error": plan.predicted_peak_bytes / measured - 1,
        "plain_error": plan.baseline_peak_bytes / none - 1,
        "memory_source": plan.sources["memory"],
        "segments": plan.sources["segments"],
    }


def render(title, rows):
    table = Table(title=title)
    for col in (
        "model",
        "chains (blocks)",
        "coverage",
        "exact",
        "blocks",
        "own",
        "plan at 60%",
        "plan predicted vs measured",
        "plain predicted vs measured",
        "memory from",
    ):
        table.add_column(col)
    for r in rows:
        own, at60 = r["own_checkpointing_saving"], r["plan_60_saving"]
        table.add_row(
            r["model"],
            f"{len(r['chains'])} ({r['blocks_found']})",
            f"{r['coverage']:.0%}",
            f"{len(r['exact'])}/{len(STRATEGIES)}",
            f"-{r['blocks_saving']:.1%}",
            "-" if own is None else f"-{own:.1%}",
            f"-{at60:.1%}" if isinstance(at60, float) else f"min {at60}",
            f"{r['plan_error']:+.2%}",
            f"{r['plain_error']:+.2%}",
            r["memory_source"].split(":")[0],
        )
    Console().print(table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for name, build in {**BUILDERS, **MORE, **STACKS}.items():
        torch.manual_seed(0)
        rows.append(row(name, *build()))
    render("memfit on real architectures (CPU)", rows)
    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"real-models-cpu-{date}.json"
    write_json(
        path,
        {
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "date": date,
            "torch": torch.__version__,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
