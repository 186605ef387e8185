"""`memfit ...`: thin commands over the library. Errors a user can fix print one
line and exit 2; a failed verification exits 1."""
from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from torch.utils._pytree import tree_map

from memfit import models
from memfit.errors import MemfitError


def _load(args):
    """Device, model (on it), batch and loss function from the model options."""
    from memfit.verify import resolve_device

    device = resolve_device(args.device)
    model, batch, loss_fn = models.load(args.model, args.size, args.batch_size, args.seed)
    model = model.to(device).train()
    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    return device, model, batch, loss_fn


def _verify(args, out: Console) -> int:
    from memfit.report import check_writable, verify_table, write_json
    from memfit.verify import parse_expected_reduction, verify

    expect = parse_expected_reduction(args.expect_reduction)
    json_path = check_writable(args.json) if args.json else None
    device, model, batch, loss_fn = _load(args)
    report = verify(model, batch, loss_fn, args.strategy, steps=args.steps, device=device, seed=args.seed,
                    blocks=args.blocks, expect_reduction=expect, grad_tol=args.grad_tol,
                    state_replay=not args.torch_checkpoint, name=args.model)
    out.print(verify_table(report))
    if json_path:
        write_json(json_path, report)
        out.print(f"report written to {json_path}")
    if report["passed"]:
        out.print("[bold green]PASS[/]: same training"
                  + (f", {report['memory_reduction']:.1%} less peak memory" if report["memory_reduction"] else ""))
        return 0
    out.print("[bold red]FAIL[/]: " + "; ".join(report["failures"]))
    return 1


def _plan(args, out: Console) -> int:
    from dataclasses import asdict

    from memfit.planner import parse_budget, plan
    from memfit.report import check_writable, plan_table, write_json
    from memfit.verify import measure

    parse_budget(args.budget, baseline_peak=1)  # a bad budget fails before any work
    json_path = check_writable(args.json) if args.json else None
    device, model, batch, loss_fn = _load(args)
    p = plan(model, batch, loss_fn, args.budget, blocks=args.blocks, cost=args.cost)
    out.print(str(p), markup=False, highlight=False)
    measured = None
    if not args.no_measure:
        measured = measure(model, batch, loss_fn, p, blocks=args.blocks)
        base = measure(model, batch, loss_fn, "none", blocks=args.blocks, timed_steps=0)
        measured["recompute_flops"] = measured["flops"] / base["flops"] - 1
    out.print(plan_table(p, measured))
    if json_path:
        write_json(json_path, {**asdict(p), "measured_peak_bytes": measured and measured["peak_bytes"]})
        out.print(f"plan written to {json_path} (apply it with memfit.apply(model, memfit.Plan.load(path)) "
                  f"or --strategy plan:{json_path})")
    return 0


def _parse_budgets(text: str) -> list[float]:
    try:
        values = [float(x.strip().rstrip("%")) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 100 for v in values):
        raise MemfitError(f"--budgets {text!r} must be percentages of the plain run's peak, above 0 and at most "
                          f"100, separated by commas, like 20,40,60,80,100.")
    return [int(v) if v == int(v) else v for v in values]


def _bench(args, out: Console) -> int:
    from memfit.bench import frontier
    from memfit.report import bench_table, check_writable, plot_frontier, write_json

    budgets = _parse_budgets(args.budgets)
    json_path = check_writable(args.json) if args.json else None
    plot_path = check_writable(args.plot) if args.plot else None
    device, model, batch, loss_fn = _load(args)
    rows = frontier(model, batch, loss_fn, budgets, cost=args.cost, blocks=args.blocks)
    out.print(bench_table(rows))
    if json_path:
        write_json(json_path, {"model": args.model, "size": args.size, "device": str(device),
                               "torch_version": torch.__version__, "cost": args.cost, "rows": rows})
        out.print(f"rows written to {json_path}")
    if plot_path:
        plot_frontier(rows, plot_path, title=f"{args.model} on {device}")
        out.print(f"plot written to {plot_path}")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=models.DEFAULT,
                   help=f"{', '.join(models.REGISTRY)}, or package.module:factory (default: {models.DEFAULT})")
    p.add_argument("--size", help="size of a built-in model (gpt: tiny, small, medium, gpt2; "
                   "mlp: tiny, small, large; resnet-se: tiny, small, full)")
    p.add_argument("--blocks", help="which modules are the blocks: a container path like transformer.h or "
                   "a pattern like 'layers.*' (default: found automatically)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfit", description="Make PyTorch training fit in memory by recomputing "
                                "activations, and prove it is the same training.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="train with and without checkpointing; compare memory, time, gradients",
                       description="Train a model for a few steps without and with a checkpointing strategy, "
                       "from the same seed and batch, and report peak memory, slowdown, recomputed FLOPs and "
                       "whether gradients, buffers and losses are the same. Exit 0 on PASS, 1 on FAIL.")
    _model_options(v)
    v.add_argument("--strategy", default="blocks", help="none, blocks, every:K, segments:N, sqrt, selective, "
                   "plan:BUDGET (e.g. plan:60%%) or plan:FILE.json (default: blocks)")
    v.add_argument("--steps", type=int, default=5, help="timed steps per run, after a warm-up step and "
                   "the steps that measure memory and FLOPs (default: 5)")
    v.add_argument("--expect-reduction", metavar="MIN:MAX",
                   help="PASS only if the peak memory saved is within MIN..MAX percent (default: any saving)")
    v.add_argument("--grad-tol", type=float, help="largest relative gradient difference that passes "
                   "(default: 0, bitwise, on CPU; 1e-4 on accelerators)")
    v.add_argument("--torch-checkpoint", action="store_true",
                   help="use PyTorch's own checkpoint semantics (BatchNorm statistics updated twice), "
                   "to see what memfit fixes")
    v.add_argument("--json", metavar="PATH", help="write the report as JSON")
    v.set_defaults(run=_verify)

    pl = sub.add_parser("plan", help="the fastest checkpointing plan that fits a memory budget",
                        description="Profile the model's blocks, choose per block keep / selective / recompute "
                        "(and segments) to minimise recomputation under the budget, print the plan, then measure "
                        "one step with it and show predicted and measured peak side by side.")
    _model_options(pl)
    pl.add_argument("--budget", required=True, help="20GiB, 800MB, 60%% (of the plain run's peak) or auto")
    pl.add_argument("--cost", default="time", choices=["time", "flops"],
                    help="what to minimise: measured time (default) or FLOPs (deterministic)")
    pl.add_argument("--no-measure", action="store_true", help="only plan; do not measure a step")
    pl.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    pl.set_defaults(run=_plan)

    b = sub.add_parser("bench", help="measure the memory/time frontier: plans at many budgets and every "
                       "uniform strategy")
    _model_options(b)
    b.add_argument("--budgets", default="20,30,40,50,60,70,80,90,100",
                   help="percentages of the plain run's peak (default: 20,30,...,100)")
    b.add_argument("--cost", default="time", choices=["time", "flops"])
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.add_argument("--plot", metavar="PNG", help="plot peak memory against slowdown (needs matplotlib)")
    b.set_defaults(run=_bench)
    return p


def main(argv=None) -> int:
    words, joined = iter(sys.argv[1:] if argv is None else argv), []
    for word in words:  # `--budget -5GiB` is a (bad) budget, not an option
        joined.append(f"--budget={next(words, '')}" if word == "--budget" else word)
    args = parser().parse_args(joined)
    out = Console()
    try:
        return args.run(args, out)
    except MemfitError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
