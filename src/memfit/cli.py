"""`memfit ...`: thin commands over the library. Errors a user can fix print one
line and exit 2; a failed verification exits 1."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from memfit import models
from memfit.errors import MemfitError


def _verify(args, out: Console) -> int:
    from memfit.report import check_writable, verify_table, write_json
    from memfit.verify import parse_expected_reduction, resolve_device, verify

    expect = parse_expected_reduction(args.expect_reduction)
    json_path = check_writable(args.json) if args.json else None
    device = resolve_device(args.device)
    model, batch, loss_fn = models.load(args.model, args.size, args.batch_size, args.seed)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfit", description="Make PyTorch training fit in memory by recomputing "
                                "activations, and prove it is the same training.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="train with and without checkpointing; compare memory, time, gradients",
                       description="Train a model for a few steps without and with a checkpointing strategy, "
                       "from the same seed and batch, and report peak memory, slowdown, recomputed FLOPs and "
                       "whether gradients, buffers and losses are the same. Exit 0 on PASS, 1 on FAIL.")
    v.add_argument("--model", default=models.DEFAULT,
                   help=f"{', '.join(models.REGISTRY)}, or package.module:factory (default: {models.DEFAULT})")
    v.add_argument("--size", help="size of a built-in model (gpt: tiny, small, medium, gpt2; "
                   "mlp: tiny, small, large; resnet-se: tiny, small, full)")
    v.add_argument("--strategy", default="blocks",
                   help="none, blocks, every:K, segments:N, sqrt, selective (default: blocks)")
    v.add_argument("--blocks", help="which modules are the blocks: a container path like transformer.h or "
                   "a pattern like 'layers.*' (default: found automatically)")
    v.add_argument("--batch-size", type=int)
    v.add_argument("--steps", type=int, default=5, help="timed steps per run, after a warm-up and a measured "
                   "step (default: 5)")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--expect-reduction", metavar="MIN:MAX",
                   help="PASS only if the peak memory saved is within MIN..MAX percent (default: any saving)")
    v.add_argument("--grad-tol", type=float, help="largest relative gradient difference that passes "
                   "(default: 0, bitwise, on CPU; 1e-4 on accelerators)")
    v.add_argument("--torch-checkpoint", action="store_true",
                   help="use PyTorch's own checkpoint semantics (BatchNorm statistics updated twice), "
                   "to see what memfit fixes")
    v.add_argument("--json", metavar="PATH", help="write the report as JSON")
    v.set_defaults(run=_verify)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Console()
    try:
        return args.run(args, out)
    except MemfitError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
