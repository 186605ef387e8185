"""`memfit ...`: thin commands over the library. Errors a user can fix print one
line and exit 2; a failed verification exits 1."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from rich.console import Console
from torch.utils._pytree import tree_leaves, tree_map

from memfit import models
from memfit.errors import MemfitError


def _load(args):
    """Device, model (on it), batch and loss function from the model options."""
    from memfit.core.measurement import resolve_device

    device = resolve_device(args.device)
    model, batch, loss_fn = models.load(
        args.model, args.size, args.batch_size, args.seed, getattr(args, "seq_len", None)
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if getattr(args, "distributed", None) == "fsdp":
        dtype = torch.float32  # bf16: FSDP2's mixed precision, fp32 shards (NOTE [one rank simulated])
    if next(model.parameters()).device.type == "meta":  # too big for this machine: it stays unallocated
        return device, model.to(dtype).train(), batch, loss_fn
    model = model.to(device, dtype).train()
    batch = tree_map(
        lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype) if isinstance(t, torch.Tensor) else t, batch
    )
    return device, model, batch, loss_fn


def _save(out: Console, path, what: str, write) -> None:
    """Write an output after the results are printed; if it cannot be
    written now, say so in one sentence (the results are on screen)."""
    try:
        write()
    except OSError as e:
        raise MemfitError(
            f"the results are above, but writing the {what} to {path} failed ({e.strerror}); "
            f"free space or choose another path and run again."
        ) from None
    out.print(f"{what} written to {path}")


def _verify(args, out: Console) -> int:
    from memfit.tools.report import check_writable, verify_table, write_json
    from memfit.tools.verification import verify

    expect = _expected_reduction(args.expect_reduction)
    json_path = check_writable(args.json) if args.json else None
    device, model, batch, loss_fn = _load(args)
    report = verify(
        model,
        batch,
        loss_fn,
        args.strategy,
        steps=args.steps,
        device=device,
        seed=args.seed,
        blocks=args.blocks,
        expect_reduction=expect,
        grad_tol=args.grad_tol,
        state_replay=not args.torch_checkpoint,
        name=args.model,
        compile=args.compile,
    )
    out.print(verify_table(report))
    if report["passed"]:
        out.print(
            "[bold green]PASS[/]: same training"
            + (f", {report['memory_reduction']:.1%} less peak memory" if report["memory_reduction"] else "")
        )
    else:
        out.print("[bold red]FAIL[/]: " + "; ".join(report["failures"]))
    if json_path:
        _save(out, json_path, "report", lambda: write_json(json_path, report))
    return 0 if report["passed"] else 1


def _expected_reduction(text: str | None) -> tuple[float, float] | None:
    """'20:40' (percent) -> (0.2, 0.4). None -> None (the default check)."""
    if text is None:
        return None
    try:
        lo, hi = (float(x.strip().rstrip("%")) / 100 for x in text.split(":"))
    except ValueError:
        lo = hi = float("nan")
    if not (0 <= lo <= hi <= 1):  # fractions now: 20:500 is 0.2..5.0, refused
        raise MemfitError(
            f"--expect-reduction {text!r} must be MIN:MAX in percent with 0 <= MIN <= MAX <= 100, like 20:40."
        )
    return lo, hi


def _plan(args, out: Console) -> int:
    from memfit.core.measurement import measure
    from memfit.core.schedule import Budget
    from memfit.planning.planner import plan
    from memfit.tools.report import check_writable, plan_table, write_json

    budget = Budget.parse(args.budget)  # a bad budget fails before any work
    json_path = check_writable(args.json) if args.json else None
    if args.device == "cuda" and not torch.cuda.is_available():
        _simulated_cuda(args, out)
    if args.distributed:
        return _plan_cluster(args, out, budget, json_path)
    device, model, batch, loss_fn = _load(args)
    p = plan(model, batch, loss_fn, budget, blocks=args.blocks, cost=args.cost, compile=args.compile)
    out.print(str(p), markup=False, highlight=False)
    measured = None
    if not args.no_measure and not args.compile:
        measured = measure(model, batch, loss_fn, p, blocks=args.blocks, timed_steps=5, against="none")
    out.print(plan_table(p, measured))
    if json_path:
        _save(
            out,
            json_path,
            "plan",
            lambda: write_json(json_path, {**p.to_dict(), "measured_peak_bytes": measured and measured["peak_bytes"]}),
        )
        out.print(f"apply it with memfit.apply(model, memfit.Plan.load(path)) or --strategy plan:{json_path}")
    return 0


def _simulated_cuda(args, out: Console) -> None:
    """`--device cuda` on a machine without one: the step simulated with this torch's CPU kernels, and what may
    differ on CUDA said (NOTE [simulated steps] in memfit.planning.simulation)."""
    if not (args.no_measure or args.distributed):
        raise MemfitError("no CUDA device here to measure on; add --no-measure to plan on a simulated CUDA step.")
    args.device = "cpu"
    out.print(
        "no CUDA device here: the step is simulated with this torch's CPU kernels. On CUDA, the fused attention "
        "kernels (flash, memory-efficient) save other tensors (log-sum-exp statistics, dropout's random state), "
        "so peaks with attention may differ by those. The numbers are allocated bytes: the CUDA caching allocator "
        "reserves more (it rounds each block up to 512 bytes, packs small ones in 2 MiB segments and rounds large "
        "ones to 2 MiB, c10/cuda/CUDACachingAllocator.cpp, and fragments); torch.cuda.memory_reserved() shows it.",
        highlight=False,
    )


def _layouts(args) -> list:
    """The layouts `--distributed`, `--world-size 8,128`, `--tp K` and `--dtype` ask for."""
    from memfit.planning.sharding import Layout

    try:
        worlds = [int(w) for w in (args.world_size or "").split(",") if w.strip()]
    except ValueError:
        worlds = []
    if not worlds:
        raise MemfitError(f"--world-size {args.world_size!r} must be numbers of ranks separated by commas, like 8,128.")
    parallelize = None
    if args.tp > 1:
        parallelize = _parallelize_of(args)
    mixed = torch.bfloat16 if args.dtype == "bf16" and args.distributed == "fsdp" else None
    options = dict(tp=args.tp, parallelize=parallelize, param_dtype=mixed, reshard_after_forward=not args.no_reshard)
    return [Layout(args.distributed, w, **options) for w in worlds]


def _parallelize_of(args):
    """The tensor parallelism of `--tp`: `--parallelize package.module:fn`, or the built-in model's own."""
    import importlib

    if args.parallelize:
        module, _, name = args.parallelize.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise MemfitError(
                f"cannot load --parallelize {args.parallelize!r} ({e}); give package.module:fn."
            ) from None
    if args.model == "gpt":
        return models.gpt.tensor_parallel
    if args.model.startswith("hf:"):
        from memfit.models import hf

        return hf.tensor_parallel
    raise MemfitError(f"--tp needs --parallelize package.module:fn for {args.model} (fn(model, tp_mesh) applies it).")


def _plan_cluster(args, out: Console, budget, json_path) -> int:
    """`memfit plan --distributed ...`: one rank's peak at each world size asked, per strategy and planned."""
    from memfit.tools.cluster import cluster_rows
    from memfit.tools.report import cluster_table, write_json

    if args.compile:
        raise MemfitError("planning for a compiled step is for one process; give --compile or --distributed, not both.")
    layouts = _layouts(args)
    device, model, batch, loss_fn = _load(args)
    rows = cluster_rows(model, batch, loss_fn, budget, layouts, blocks=args.blocks, cost=args.cost)
    size = next(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)).shape[0]
    out.print(cluster_table(rows, f"one rank of {args.model}, batch {size} per data-parallel rank"))
    if json_path:
        _save(out, json_path, "rows", lambda: write_json(json_path, {"rows": rows}))
    return 0


def _parse_budgets(text: str) -> list[float]:
    try:
        values = [float(x.strip().rstrip("%")) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 100 for v in values):
        raise MemfitError(
            f"--budgets {text!r} must be percentages of the plain run's peak, above 0 and at most "
            f"100, separated by commas, like 20,40,60,80,100."
        )
    return [int(v) if v == int(v) else v for v in values]


def _bench(args, out: Console) -> int:
    from memfit.tools.bench import sweep
    from memfit.tools.report import (
        bench_table,
        check_writable,
        plot_frontier,
        require_matplotlib,
        write_json,
    )

    budgets = _parse_budgets(args.budgets)
    json_path = check_writable(args.json) if args.json else None
    plot_path = check_writable(args.plot) if args.plot else None
    if plot_path:
        require_matplotlib()
    device, model, batch, loss_fn = _load(args)
    rows = sweep(model, batch, loss_fn, budgets, cost=args.cost, blocks=args.blocks)
    out.print(bench_table(rows))
    if json_path:
        _save(
            out,
            json_path,
            "rows",
            lambda: write_json(
                json_path,
                {
                    "model": args.model,
                    "size": args.size,
                    "device": str(device),
                    "torch_version": torch.__version__,
                    "cost": args.cost,
                    "rows": rows,
                },
            ),
        )
    if plot_path:
        _save(out, plot_path, "plot", lambda: plot_frontier(rows, plot_path, title=f"{args.model} on {device}"))
    return 0


def _train_outputs(args):
    """`--out` and `--metrics`, checked writable before any work: (out dir or None, metrics path or None)."""
    from pathlib import Path

    from memfit.tools.report import check_writable

    out_dir = None
    if args.out:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise MemfitError(f"--out {out_dir} is a file; give a directory (it is created if missing).")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemfitError(f"cannot create --out {out_dir} ({e.strerror}); choose a writable directory.") from None
        check_writable(out_dir / "model.pt")
    metrics_path = args.metrics or (out_dir / "metrics.jsonl" if out_dir else None)
    if metrics_path:
        check_writable(metrics_path)
    return out_dir, metrics_path


def _train_callback(out: Console, progress, max_iters: int):
    """Renders `train`'s events: the startup report, a progress bar with each logged step, the end."""
    from memfit.core.memory import fmt_bytes

    task = None

    def callback(event, data):
        nonlocal task
        if event == "start":
            r = data
            out.print(
                f"memfit train: {r['model']} ({r['parameters']:,} parameters) on {r['device']}, "
                f"{r['precision']} ({r['dtype']} weights)"
            )
            mark = "[green]✓[/]" if r["gradient_checkpointing"] != "DISABLED" else "[yellow]✗[/]"
            out.print(f"{mark} Gradient checkpointing: {r['gradient_checkpointing']}")
            if r["world_size"] > 1 or r["distributed"] != "none":
                out.print(
                    f"  {r['distributed'].upper()} over {r['world_size']} processes: global batch "
                    f"{r['batch_size']}, {r['batch_size'] // r['world_size']} per process"
                )
            per = " per process" if r["distributed"] != "none" else ""
            out.print(
                f"  Predicted peak memory{per} for batch {r['batch_size']}: {fmt_bytes(r['predicted_peak_bytes'])}"
            )
            out.print(
                f"  Recommended batch size for {fmt_bytes(r['memory_budget_bytes'])} "
                f"({r['memory_budget_source']}): {r['recommended_batch_size']}"
            )
            if "unigram_entropy" in r:
                out.print(f"  Unigram entropy of the data: {r['unigram_entropy']:.3f} nats")
            progress.start()
            task = progress.add_task("train", total=max_iters, status="")
        elif event == "step":
            if data:
                mem = " ".join(f"{k.split('/')[1]} {v:.3f} GB" for k, v in data.items() if k.startswith("memory/"))
                status = f"loss {data['loss']:.4f}  {data['step_time_s'] * 1e3:.0f} ms/step  {mem}"
                if "val_loss" in data:
                    status += f"  val {data['val_loss']:.4f}"
                progress.update(task, status=status)
                progress.console.print(f"iter {data['iter']}: {status}", highlight=False)
            progress.advance(task)
        else:
            progress.stop()

    return callback


def _train_overrides(args) -> dict:
    """The config keys `train`'s flags set, as `resolve` takes them: {"training.max_iters": "100", ...}."""
    overrides = {
        f"training.{k}": v
        for k, v in (
            ("gradient_checkpointing", args.gradient_checkpointing),
            ("max_iters", args.max_iters),
            ("batch_size", args.batch_size),
            ("precision", args.precision),
            ("device", args.device),
            ("memory_budget", args.memory_budget),
            ("log_interval", args.log_interval),
            ("seed", args.seed),
            ("distributed", args.distributed),
        )
        if v is not None
    }
    if args.data is not None:
        overrides["data.path"] = args.data
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise MemfitError(f"--set {item!r} must be KEY=VALUE, like training.learning_rate=3e-4.")
        overrides[key.strip()] = value
    return overrides


def _train(args, out: Console) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from memfit.train.config import resolve
    from memfit.train.loop import train

    cfg = resolve(args.config, _train_overrides(args))
    out_dir, metrics_path = _train_outputs(args)
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=out,
    )
    callback = _train_callback(out, progress, cfg["training"]["max_iters"])
    try:
        summary = train(cfg, callback=callback, out_dir=out_dir, metrics_path=metrics_path)
    finally:
        progress.stop()
    if summary is None:  # a rank other than 0 of a distributed run: rank 0 reports and writes
        return 0
    out.print(
        f"final loss {summary['final_loss']:.4f}"
        + (f", validation loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else "")
    )
    if "not_written" in summary:
        raise MemfitError(
            f"the run finished but its files could not be written ({summary['not_written']}); "
            f"the results are above, and --out holds the previous run's files as they were."
        )
    if metrics_path:
        out.print(f"metrics written to {metrics_path}")
    if out_dir:
        out.print(f"weights, resolved config and metrics written to {out_dir}")
    return 0


def _fit(args, out: Console) -> int:
    from memfit.core.memory import fmt_bytes
    from memfit.core.schedule import Budget
    from memfit.planning.fit import STRATEGIES, fit
    from memfit.tools.report import check_writable, fit_table, write_json

    parsed = Budget.parse(args.budget)  # a bad budget fails before any work
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else list(STRATEGIES)
    json_path = check_writable(args.json) if args.json else None
    device, model, _, loss_fn = _load(args)
    budget = parsed.bytes(device=device)  # auto: the free memory of the device used
    module = models.REGISTRY.get(args.model)
    if module is None:
        raise MemfitError(
            "memfit fit works on the built-in models; for your own, call memfit.planning.fit.fit(model, "
            "make_batch, loss_fn, budget) from Python."
        )
    size = args.size or "small"

    def make_batch(b):
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, module.batch(size, b, args.seed))

    rows = fit(model, make_batch, loss_fn, budget, strategies, blocks=args.blocks, timing=not args.no_time)
    out.print(fit_table(rows, f"largest batch in {fmt_bytes(budget)}: {args.model} on {device}"))
    if json_path:
        _save(
            out,
            json_path,
            "rows",
            lambda: write_json(
                json_path,
                {"model": args.model, "size": size, "device": str(device), "budget_bytes": budget, "rows": rows},
            ),
        )
    return 0


def _attribution_inputs(args, out: Console):
    """(model in eval mode, videos, the demo's classes or None, targets or None), every one checked before
    any work: the videos load and fit the model, the targets are its classes, the chunk size fits the clips."""
    from memfit.attribution import check_inputs
    from memfit.attribution.io import load_video, video_ids
    from memfit.attribution.run import demo

    if args.demo:
        out.print("training the demo video model on synthetic clips (one motion pattern per class) ...")
        model, videos, classes = demo()
    else:
        videos = {vid: load_video(path) for vid, path in video_ids(args.videos).items()}
        classes = None
        model = _attribution_model(args)
    model.eval()
    targets = _targets(args.target or [], videos)
    if args.demo and targets is None:  # the demo knows each clip's true class: explain that one
        targets = {vid: models.video.MOTIONS.index(cls) for vid, cls in classes.items()}
    check_inputs(model, videos, targets, mode="chunked" if args.compare else args.mode, chunk_size=args.chunk_size)
    return model, videos, classes, targets


def _attribution_run(args, out: Console, model, videos, targets, strategy):
    """Attribute, with a progress bar: (the --compare report or None, results, cache, memory tracker)."""
    import contextlib
    import tempfile

    from rich.progress import Progress

    from memfit.attribution import attribute, cache_for, checkpoint_model
    from memfit.attribution.run import compare
    from memfit.core.memory import track_memory

    cache = mem = results = None
    progress = Progress(console=out, transient=True)
    bar = progress.add_task("attribute", total=None)

    def advance(*where):
        *mode, vid, chunk, chunks = where
        progress.update(bar, advance=1, description=" ".join([*mode, vid, f"chunk {chunk + 1}/{chunks}"]))

    progress.start()
    try:
        if args.compare:
            report = compare(
                model,
                videos,
                targets,
                chunk_size=args.chunk_size,
                reduce=args.reduce,
                times_input=args.times_input,
                strategy=strategy,
                progress=advance,
            )
        else:
            report = None
            checkpoint_model(model, strategy)
            with contextlib.ExitStack() as stack:
                cache_root = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="memfit_"))
                cache = cache_for(cache_root, args.model, model, args.mode, args.chunk_size)
                with track_memory(model) as mem:
                    results = attribute(
                        model,
                        videos,
                        targets,
                        mode=args.mode,
                        chunk_size=args.chunk_size,
                        reduce=args.reduce,
                        times_input=args.times_input,
                        cache=cache,
                        progress=advance,
                    )
    finally:
        progress.stop()
    return report, results, cache, mem


def _attribute(args, out: Console) -> int:
    from pathlib import Path

    from memfit.attribution import choose_checkpointing
    from memfit.attribution.run import write_outputs
    from memfit.tools.report import (
        check_writable,
        compare_tables,
        fmt_bytes,
        require_matplotlib,
        write_json,
    )

    if not args.videos and not args.demo:
        raise MemfitError("give videos (.npy / .pt files or directories of numbered frames) or --demo.")
    json_path = check_writable(args.json) if args.json else None
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        require_matplotlib()
        out_dir.mkdir(parents=True, exist_ok=True)
        check_writable(out_dir / "summary.json")
    model, videos, classes, targets = _attribution_inputs(args, out)
    longest = max(videos.values(), key=len)
    unit = longest[: args.chunk_size] if args.mode == "chunked" else longest
    strategy, predicted, plain = choose_checkpointing(model, unit, budget=args.budget, strategy=args.strategy)
    if predicted is not None:
        out.print(
            f"budget {args.budget}: checkpointing {strategy}, simulated peak {fmt_bytes(predicted)} for the "
            f"longest {'chunk' if args.mode == 'chunked' else 'clip'} (without checkpointing: "
            f"{fmt_bytes(plain)})"
        )
    report, results, cache, mem = _attribution_run(args, out, model, videos, targets, strategy)
    if report is not None:
        for table in compare_tables(report, len(videos)):
            out.print(table)
        out.print(
            f"chunked mode (chunks of {args.chunk_size}) is an approximation: the model's temporal "
            f"transformer mixes frames, and a chunk sees only its own."
        )
        results = report["results"]["exact"]
    else:
        _print_attribution_run(args, out, cache, mem, strategy, predicted)
    for vid, r in results.items():
        top = sorted(range(len(r["scores"])), key=lambda i: -r["scores"][i])[:5]
        label = f" ({classes[vid]})" if classes else ""
        out.print(f"{vid}{label}: target {r['target']}, most important frames {top}")
    if json_path:
        data = results if report is None else {k: v for k, v in report.items() if k != "results"}
        _save(out, json_path, "scores", lambda: write_json(json_path, data))
    if out_dir:
        _save(out, out_dir, "per-video CSV, JSON and plots", lambda: write_outputs(results, out_dir, classes))
    return 0


def _print_attribution_run(args, out: Console, cache, mem, strategy: str, predicted) -> None:
    """What one `memfit attribute` run did: the chunks cached and reused, and its measured peak."""
    from memfit.core.memory import fmt_bytes

    where = f"cached in {cache.dir}" if args.cache_dir else "computed (no --cache-dir: nothing kept)"
    out.print(
        f"gradients {where} ({len(cache.reused)} chunks reused"
        + (f", {len(cache.corrupt)} corrupt and recomputed: {', '.join(cache.corrupt)}" if cache.corrupt else "")
        + (f", {len(cache.unwritten)} computed but not cached: {cache.unwritten[0]}" if cache.unwritten else "")
        + ")"
    )
    out.print(
        f"checkpointing {strategy}: measured peak {fmt_bytes(mem.peak_bytes)} ({mem.source})"
        + (f", simulated {fmt_bytes(predicted)}" if args.budget else "")
    )


def _attribution_model(args):
    """The model `memfit attribute` explains: the built-in video model, or a
    user's `package.module:factory`; with `--weights` loaded into it."""
    if args.model == "video":
        if args.size and args.size not in models.video.SIZES:
            raise MemfitError(
                f"unknown size {args.size!r} for the video model; sizes: {', '.join(models.video.SIZES)}."
            )
        torch.manual_seed(0)  # without --weights: the same untrained model every run (and cache key)
        model = models.video.create_video(models.video.SIZES[args.size or "small"])
    else:
        if args.size:
            raise MemfitError("--size is for the built-in video model; a factory decides its own model's size.")
        model = models.load(args.model)[0]
    if args.weights:
        try:
            state = torch.load(args.weights, weights_only=True)
        except Exception as e:
            raise MemfitError(
                f"cannot read weights {args.weights} ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0]}); give a state_dict saved with "
                f"torch.save(model.state_dict(), PATH)."
            ) from None
        if not isinstance(state, dict):
            raise MemfitError(
                f"weights {args.weights} hold a {type(state).__name__}, not a state_dict; save them "
                f"with torch.save(model.state_dict(), PATH)."
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # missing and unexpected keys, size mismatches: all of it, on one line
            raise MemfitError(
                f"weights {args.weights} do not fit this model ({' '.join(str(e).split())}); give "
                f"a state_dict saved from the same model."
            ) from None
    return model


def _targets(values: list[str], videos: dict) -> dict | None:
    """Per-video target classes from `--target 3` (every video) and
    `--target video_001=2` (one video); None: each video's predicted class."""
    targets, default = {}, None
    for value in values:
        vid, _, cls = value.rpartition("=")
        if not cls.strip().lstrip("-").isdigit():
            raise MemfitError(
                f"--target {value!r} is not a class; give a class number like 3, or VIDEO=CLASS like video_001=3."
            )
        if not vid:
            default = int(cls)
        elif vid not in videos:
            raise MemfitError(f"--target {value!r} names no video given; videos: {', '.join(videos)}.")
        else:
            targets[vid] = int(cls)
    if default is None and not targets:
        return None
    return {v: targets.get(v, default) for v in videos if targets.get(v, default) is not None}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=models.DEFAULT,
        help=f"{', '.join(models.REGISTRY)}, hf:gpt2|llama|bert, hf:PATH/config.json (built on the meta device, "
        f"never allocated), or package.module:factory (default: {models.DEFAULT})",
    )
    p.add_argument(
        "--size",
        help="size of a built-in model (gpt: tiny, small, medium, gpt2; "
        "mlp: tiny, small, large; resnet-se: tiny, small, full)",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="weights and floating inputs in this type (bf16: half the bytes, as on a GPU)",
    )
    p.add_argument(
        "--blocks",
        help="which modules are the blocks: a container path like transformer.h or "
        "a pattern like 'layers.*' (default: found automatically)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memfit",
        description="Make PyTorch training fit in memory by recomputing "
        "activations, and prove it is the same training.",
        epilog="--debug (anywhere, or MEMFIT_DEBUG=1): show the traceback of an error.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _verify_command(sub)
    _plan_command(sub)
    _bench_command(sub)
    _train_command(sub)
    _fit_command(sub)
    _attribute_command(sub)
    return p


def _verify_command(sub) -> None:

    v = sub.add_parser(
        "verify",
        help="train with and without checkpointing; compare memory, time, gradients",
        description="Train a model for a few steps without and with a checkpointing strategy, "
        "from the same seed and batch, and report peak memory, slowdown, recomputed FLOPs and "
        "whether gradients, buffers and losses are the same. Exit 0 on PASS, 1 on FAIL.",
    )
    _model_options(v)
    v.add_argument(
        "--strategy",
        default="blocks",
        help="none, blocks, every:K, segments:N, sqrt, selective, scores, "
        "pointwise, offload (CUDA), plan:BUDGET (e.g. plan:60%%) or plan:FILE.json (default: blocks)",
    )
    v.add_argument(
        "--steps",
        type=int,
        default=5,
        help="timed steps per run, after a warm-up step and the steps that measure memory and FLOPs (default: 5)",
    )
    v.add_argument(
        "--expect-reduction",
        metavar="MIN:MAX",
        help="PASS only if the peak memory saved is within MIN..MAX percent (default: any saving)",
    )
    v.add_argument(
        "--grad-tol",
        type=float,
        help="largest relative gradient difference that passes (default: 0, bitwise, on CPU; 1e-4 on accelerators)",
    )
    v.add_argument(
        "--torch-checkpoint",
        action="store_true",
        help="use PyTorch's own checkpoint semantics (BatchNorm statistics updated twice), to see what memfit fixes",
    )
    v.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="compile both runs with torch.compile (default backend inductor; aot_eager compiles "
        "fastest) and report the memory saved under compile",
    )
    v.add_argument("--json", metavar="PATH", help="write the report as JSON")
    v.set_defaults(run=_verify)


def _plan_command(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="the fastest checkpointing plan that fits a memory budget",
        description="Profile the model's blocks, choose per block keep / pointwise / scores / "
        "selective / recompute (offload on CUDA), and segments, to minimise recomputation under the budget, "
        "print the plan, then measure "
        "one step with it and show predicted and measured peak side by side.",
    )
    _model_options(pl)
    pl.add_argument("--budget", required=True, help="20GiB, 800MB, 60%% (of the plain run's peak) or auto")
    pl.add_argument(
        "--cost",
        default="time",
        choices=["time", "flops"],
        help="what to minimise: time, by the device's time model (default), or FLOPs (deterministic)",
    )
    pl.add_argument("--no-measure", action="store_true", help="only plan; do not measure a step")
    pl.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="plan for the step compiled with torch.compile (default backend inductor): each plan tried "
        "is compiled and its peak measured; 60%% is then of the compiled plain step",
    )
    pl.add_argument(
        "--distributed",
        choices=["ddp", "fsdp"],
        help="plan one rank of a DDP or FSDP2 run, simulated in this process at each --world-size (no cluster "
        "needed); --batch-size is then one data-parallel rank's, and --dtype bf16 means FSDP2's mixed precision",
    )
    pl.add_argument("--world-size", metavar="N,N,...", help="the runs' numbers of ranks, like 8,128")
    pl.add_argument("--tp", type=int, default=1, help="tensor-parallel degree within --world-size (FSDP × TP)")
    pl.add_argument("--parallelize", metavar="MODULE:FN", help="fn(model, tp_mesh) applying tensor parallelism")
    pl.add_argument(
        "--no-reshard",
        action="store_true",
        help="FSDP2's reshard_after_forward=False: each unit keeps its gathered parameters from forward to backward",
    )
    pl.add_argument("--seq-len", type=int, help="tokens per sequence for --model hf:PATH/config.json")
    pl.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    pl.set_defaults(run=_plan)


def _bench_command(sub) -> None:
    b = sub.add_parser(
        "bench", help="measure the memory/time frontier: plans at many budgets and every uniform strategy"
    )
    _model_options(b)
    b.add_argument(
        "--budgets",
        default="20,30,40,50,60,70,80,90,100",
        help="percentages of the plain run's peak (default: 20,30,...,100)",
    )
    b.add_argument("--cost", default="time", choices=["time", "flops"])
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.add_argument("--plot", metavar="PNG", help="plot peak memory against slowdown (needs matplotlib)")
    b.set_defaults(run=_bench)


def _train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a recipe from a YAML config, with a memory monitor",
        description="Train one of memfit's recipes (gpt-char, vit-jepa, resnet-se, video, mlp) from a "
        "YAML config (configs/). Every key "
        "can be overridden: the flags below, or --set section.key=value.",
    )
    t.add_argument("--config", help="YAML config, e.g. configs/gpt-char.yaml (default: the gpt recipe's defaults)")
    t.add_argument(
        "--gradient-checkpointing",
        metavar="VALUE",
        help="true, false, a strategy (blocks, selective, every:2, ...) or budget:60%% / budget:8GiB",
    )
    t.add_argument("--max-iters", type=str)
    t.add_argument("--batch-size", type=str)
    t.add_argument("--precision", help="fp32, bf16 or fp16 (fp16 with a gradient scaler, on CUDA)")
    t.add_argument("--device", help="auto, cpu, cuda or mps")
    t.add_argument("--memory-budget", help="memory for the recommended batch size (default: free device memory)")
    t.add_argument("--log-interval", type=str)
    t.add_argument("--seed", type=str)
    t.add_argument(
        "--distributed",
        help="none, ddp or fsdp (FSDP2), under torchrun: gloo on CPU, nccl on CUDA; "
        "--batch-size is then the global batch, split between the processes",
    )
    t.add_argument("--data", help="text file for the gpt recipe (default: the corpus shipped with memfit)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. model.n_layer=8")
    t.add_argument("--out", metavar="DIR", help="save final weights, resolved config, metrics and summary here")
    t.add_argument("--metrics", metavar="PATH", help="JSONL metrics file (default: DIR/metrics.jsonl with --out)")
    t.set_defaults(run=_train)


def _fit_command(sub) -> None:
    f = sub.add_parser("fit", help="the largest batch that fits a memory budget, with each strategy")
    _model_options(f)
    f.add_argument("--budget", required=True, help="20GiB, 800MB, or auto")
    f.add_argument("--strategies", help="comma-separated (default: none,blocks,sqrt,selective,plan)")
    f.add_argument("--no-time", action="store_true", help="skip timing a step at each batch size")
    f.add_argument("--json", metavar="PATH", help="write rows strategy, batch_size, peak_bytes, time_per_sample_s")
    f.set_defaults(run=_fit)


def _attribute_command(sub) -> None:
    a = sub.add_parser(
        "attribute",
        help="per-frame gradient importance of video clips, exact or chunked",
        description="Gradients of the video model's class score with respect to each input frame, "
        "as a per-frame importance. Exact mode (default) runs the whole clip in one backward with "
        "checkpointing; chunked mode runs chunks of frames alone, each with only the "
        "frames around it, an approximation.",
    )
    a.add_argument(
        "videos",
        nargs="*",
        help=".npy / .pt arrays (frames x channels x height x width) or directories of numbered PNG/JPEG frames",
    )
    a.add_argument("--demo", action="store_true", help="synthetic clips and a briefly trained video model")
    a.add_argument(
        "--compare",
        action="store_true",
        help="measure exact, exact without checkpointing and chunked against each other",
    )
    a.add_argument(
        "--model",
        default="video",
        help="video (built in) or package.module:factory, whose model "
        "takes clips (B, T, C, H, W) and returns class scores (B, classes) (default: video)",
    )
    a.add_argument("--size", help="size of the video model (tiny, small, large; default small)")
    a.add_argument("--weights", help="state_dict of the model (default: untrained weights)")
    a.add_argument(
        "--target",
        action="append",
        metavar="CLASS|VIDEO=CLASS",
        help="the class to explain: for every video, or for one (repeatable; default: the predicted one)",
    )
    a.add_argument("--mode", default="exact", choices=["exact", "chunked"])
    a.add_argument("--chunk-size", type=int, default=8)
    a.add_argument("--reduce", default="l2", choices=["l2", "l1", "max"])
    a.add_argument("--times-input", action="store_true", help="gradient x input")
    a.add_argument(
        "--budget",
        help="memory budget for one clip (or chunk): 2GiB, 800MB, 60%% (of the peak "
        "without checkpointing) or auto; memfit chooses the least recomputation that fits",
    )
    a.add_argument("--strategy", help="checkpointing of the model's blocks instead of --budget (default blocks)")
    a.add_argument(
        "--cache-dir",
        help="where chunk gradients are cached (default: a new temporary directory; "
        "use a large store directory to keep them)",
    )
    a.add_argument("--out", metavar="DIR", help="per-video CSV/JSON and plots")
    a.add_argument("--json", metavar="PATH", help="scores, or with --compare the modes and comparisons, as JSON")
    a.set_defaults(run=_attribute)


def main(argv=None) -> int:
    words, joined = iter(sys.argv[1:] if argv is None else argv), []
    for word in words:  # `--budget -5GiB` is a (bad) budget, not an option
        joined.append(f"--budget={next(words, '')}" if word == "--budget" else word)
    debug = "--debug" in joined or os.environ.get("MEMFIT_DEBUG", "") not in ("", "0")
    args = parser().parse_args([w for w in joined if w != "--debug"])
    out = Console()
    formatwarning = warnings.formatwarning  # memfit's own warnings as one plain line, while the command runs
    warnings.formatwarning = lambda message, category, *rest, **kw: (
        f"{message}\n" if str(message).startswith("memfit: ") else f"{category.__name__}: {message}\n"
    )
    try:
        return args.run(args, out)
    except MemfitError as e:
        if debug:
            raise
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        frame = None if debug else _user_frame(e)
        if frame is None:
            raise
        print(
            f"memfit: error: your code raised {type(e).__name__} in {frame.name} ({frame.filename}:{frame.lineno}): "
            f"{(str(e).splitlines() or [''])[0]}; fix it, or run with --debug (MEMFIT_DEBUG=1) for the traceback.",
            file=sys.stderr,
        )
        return 2
    finally:
        warnings.formatwarning = formatwarning


def _user_frame(exc: BaseException):
    """The innermost frame of `exc`'s traceback in the user's own code (not
    memfit, the standard library or an installed package), or None."""
    import sysconfig
    import traceback
    from pathlib import Path

    libraries = [
        Path(__file__).resolve().parent,
        *(
            Path(p).resolve()
            for p in {
                sysconfig.get_paths()["stdlib"],
                sysconfig.get_paths()["purelib"],
                sysconfig.get_paths()["platlib"],
            }
        ),
    ]
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if frame.filename.startswith("<frozen") or any(path.is_relative_to(lib) for lib in libraries):
            continue
        return frame
    return None


if __name__ == "__main__":
    sys.exit(main())
