"""The training loop of the recipes: memory monitor, startup report, metrics.

The library does not print: `train` calls `callback(event, data)` with
("start", startup report), ("step", metrics or None) after every step
(metrics on log steps), and ("end", summary). `memfit train` renders them.

NOTE [whole runs]
A run killed at any moment leaves `--out` holding either the previous run's
files or the new run's, never a mix and never a half-written file. The new
run writes model.pt, config.yaml, summary.json and metrics.jsonl into a
sibling directory, `.{out}.memfit-new`; at the end, the other files of
`--out` are hard-linked into it, and the two directories are swapped in one
atomic step (renameat2 RENAME_EXCHANGE, Linux). The sibling, now holding the
previous run, is then removed (or by the next run, if a kill came first).
Where that cannot be done (another system or file system, a parent
directory memfit cannot write, a subdirectory in `--out`), each file is
written under a temporary name in `--out` and renamed into place at the end:
whole files, but a kill between those renames leaves a mix. A `--metrics`
file outside `--out` is one file of its own, renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from memfit.core import schedule
from memfit.core.measurement import resolve_device
from memfit.core.memory import GB, track_memory
from memfit.core.schedule import Budget, Plan
from memfit.core.strategies import RECOMPUTE
from memfit.core.wrapping import applied_strategy, wrap, wrapped_blocks
from memfit.errors import MemfitError
from memfit.planning import distributed
from memfit.planning.fit import largest_batch
from memfit.planning.planner import plan
from memfit.planning.simulation import simulate
from memfit.tools.report import atomic_write, exchange, write_json
from memfit.train.config import dump
from memfit.train.recipes import RECIPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_loss(loss_fn, device, precision):
    """`loss_fn` under autocast for bf16 / fp16; unchanged for fp32."""
    if precision == "fp32":
        return loss_fn

    def loss(model, batch):
        with torch.autocast(device.type, dtype=DTYPES[precision]):
            return loss_fn(model, batch)

    return loss


def checkpointing_status(model) -> str:
    """ "ENABLED (blocks: 12 of 12)", "ENABLED (selective: 5, recompute: 1 of 6)" or "DISABLED"."""
    wrapped = wrapped_blocks(model)
    if not wrapped:
        return "DISABLED"
    total = sum(a["n_blocks"] for m in model.modules() if (a := applied_strategy(m)))
    modes: dict = {}
    for _, mode in wrapped:
        modes[mode] = modes.get(mode, 0) + 1
    if list(modes) == [RECOMPUTE]:
        return f"ENABLED (blocks: {len(wrapped)} of {total})"
    return "ENABLED (" + ", ".join(f"{m}: {n}" for m, n in modes.items()) + f" of {total} blocks)"


def _to(batch, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _memory(device, model, opt, batch, step):
    """Run `step()`; return the memory monitor's metrics (GB) for it."""
    if device.type == "cuda":
        step()
        return {
            "memory/allocated": torch.cuda.memory_allocated(device) / GB,
            "memory/reserved": torch.cuda.memory_reserved(device) / GB,
            "memory/max_allocated": torch.cuda.max_memory_allocated(device) / GB,
        }
    with track_memory(model, opt, batch, device=device) as mem:
        step()
    return {"memory/live": mem.end_bytes / GB, "memory/peak": mem.peak_bytes / GB}


def train(cfg: dict, *, callback=lambda event, data: None, out_dir=None, metrics_path=None) -> dict | None:
    """Train a recipe from a resolved config (see `memfit.train.config.resolve`).

    With `training.distributed` ddp or fsdp (under torchrun), `batch_size` is
    the global batch, split evenly between the ranks, so one config trains
    the same model on any number of processes. Rank 0 plans, reports, calls
    `callback` and writes files; the others return None."""
    t, name = cfg["training"], cfg["model"]["name"]
    recipe = RECIPES[name]
    device = resolve_device(t["device"])
    if t["precision"] == "fp16" and device.type != "cuda":
        raise MemfitError(
            "fp16 training needs CUDA (a gradient scaler against underflow); set training.precision "
            "to bf16 or fp32 on this device."
        )
    ranks = distributed.setup(t["distributed"], device)
    try:
        summary = _train(
            cfg,
            recipe,
            ranks,
            callback if ranks.main else lambda event, data: None,
            out_dir if ranks.main else None,
            metrics_path if ranks.main else None,
        )
        distributed.barrier(ranks)  # no rank leaves while another still writes or communicates
        return summary
    finally:
        distributed.teardown(ranks)


def _build(cfg, recipe, ranks):
    """The recipe's model on this rank's device, checkpointed as the config says (a budget is planned once,
    on rank 0, and sent to every rank); its data, loss and first batch: (model, data, loss_fn, first)."""
    t, device = cfg["training"], ranks.device
    if t["batch_size"] % ranks.world:
        raise MemfitError(
            f"training.batch_size {t['batch_size']} (the global batch) must divide evenly between "
            f"{ranks.world} processes; use a multiple of {ranks.world}."
        )
    torch.manual_seed(t["seed"])
    arch = {k: v for k, v in cfg["model"].items() if k != "name"}
    data = recipe.data(arch, cfg["data"], t["seed"])
    arch.update(data.model_overrides)
    gc = t["gradient_checkpointing"]
    budget = schedule.parse(gc).budget
    try:
        model = recipe.create(arch, False if budget else gc).to(device).train()
    except (ValueError, TypeError, AssertionError) as e:
        raise MemfitError(f"the model section cannot build a {cfg['model']['name']} ({e}); fix its values.") from None
    loss_fn = autocast_loss(recipe.loss_fn, device, t["precision"])
    first = _to(data.batch("train", t["batch_size"]), device)
    if budget:  # planned once, on rank 0, and sent to every rank

        def make_plan():
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                return plan(
                    model, distributed.local(first, ranks), loss_fn, budget, cost="flops", distributed=ranks.spec
                ).to_json()

        wrap(model, Plan.from_json(distributed.on_main(make_plan, ranks)))

    return model, data, loss_fn, first


def _train(cfg, recipe, ranks, callback, out_dir, metrics_path):
    t = cfg["training"]
    model, data, loss_fn, first = _build(cfg, recipe, ranks)
    report = distributed.on_main(lambda: _report(cfg, model, data, loss_fn, ranks), ranks)
    callback("start", report)
    model_ = distributed.parallelize(model, ranks)  # after memfit (NOTE [order with FSDP2])
    opt = torch.optim.AdamW(model_.parameters(), lr=t["learning_rate"], weight_decay=t["weight_decay"])
    scaler = torch.amp.GradScaler("cuda") if t["precision"] == "fp16" else None
    staged = _Staged(out_dir, metrics_path)
    run = _Run(t, recipe, model, model_, opt, scaler, loss_fn, data, ranks, callback)
    try:
        history, val_loss = _loop(run, first, staged.path(metrics_path) if metrics_path else None)
    except BaseException:
        staged.discard()
        raise
    state = distributed.full_state_dict(model_, ranks)
    if not ranks.main:
        return None
    summary = {
        "report": report,
        "final_loss": history[-1]["loss"],
        "val_loss": val_loss,
        "peak_gb": max(m.get("memory/peak", m.get("memory/max_allocated", 0)) for m in history),
    }
    try:
        if out_dir:
            out = Path(out_dir)
            atomic_write(staged.path(out / "model.pt"), lambda f: torch.save(state, f), "wb")
            atomic_write(staged.path(out / "config.yaml"), lambda f: f.write(dump(cfg)))
            write_json(staged.path(out / "summary.json"), summary)
        staged.commit()
    except OSError as e:
        staged.discard()
        summary["not_written"] = f"{e.filename or out_dir}: {e.strerror}"
    callback("end", summary)
    return summary


@dataclass
class _Run:
    """What the training steps use: the config's `training` section, the recipe, the model as memfit
    checkpointed it and as it trains (`model_`: DDP or FSDP2 around it, or the same model), and the rest."""

    t: dict
    recipe: Any
    model: torch.nn.Module
    model_: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    loss_fn: Callable
    data: Any
    ranks: distributed.Ranks
    callback: Callable


def _loop(run: _Run, first, metrics_path):
    """The training steps; returns the logged metrics and the last validation loss."""
    t, device = run.t, run.ranks.device
    metrics_file = open(metrics_path, "w") if metrics_path else contextlib.nullcontext()
    history, val_loss = [], None
    with metrics_file as mf:
        for it in range(1, t["max_iters"] + 1):
            fresh = first if it == 1 else _to(run.data.batch("train", t["batch_size"]), device)
            batch = distributed.local(fresh, run.ranks)
            result = {}

            def step():
                run.opt.zero_grad(set_to_none=True)
                loss = run.loss_fn(run.model_, batch)
                if run.scaler:
                    run.scaler.scale(loss).backward()
                    run.scaler.step(run.opt)
                    run.scaler.update()
                else:
                    loss.backward()
                    run.opt.step()
                run.recipe.after_step(run.model, t)
                result["loss"] = loss.detach()

            log = it % t["log_interval"] == 0 or it in (1, t["max_iters"])
            t0 = time.perf_counter()
            memory = _memory(device, run.model_, run.opt, batch, step) if log else step()
            elapsed = time.perf_counter() - t0
            metrics = None
            if log:
                memory = {k: distributed.reduce(v, run.ranks, "max") for k, v in memory.items()}  # the fullest rank
                metrics = {
                    "iter": it,
                    "loss": distributed.reduce(result["loss"].item(), run.ranks),
                    "step_time_s": elapsed,
                    **memory,
                }
                if it % t["eval_interval"] == 0 or it == t["max_iters"]:
                    val_loss = evaluate(run.model_, run.data, run.loss_fn, t, run.ranks)
                    metrics["val_loss"] = val_loss
                history.append(metrics)
                if mf:
                    mf.write(json.dumps(metrics) + "\n")
                    mf.flush()
            run.callback("step", metrics)
    return history, val_loss


class _Staged:
    """The run's output files, written elsewhere while it runs and put in
    place together when it ends (NOTE [whole runs])."""

    NAMES = ("model.pt", "config.yaml", "summary.json")

    def __init__(self, out_dir, metrics_path):
        self.out = Path(out_dir) if out_dir else None
        self.metrics = Path(metrics_path) if metrics_path else None
        self.stage = None
        if self.out is None:
            return
        stage = self.out.parent / f".{self.out.name}.memfit-new"
        shutil.rmtree(stage, ignore_errors=True)  # what a killed run left: its new files, or the run before
        with contextlib.suppress(OSError):
            stage.mkdir()
            if stage.stat().st_dev == self.out.stat().st_dev:
                self.stage = stage

    def path(self, final) -> Path:
        """Where `final` is written while the run runs."""
        final = Path(final)
        if self.stage is not None and final.parent == self.out:
            return self.stage / final.name
        return final.with_name(f".{final.name}.partial")

    def commit(self):
        finals = [self.out / n for n in self.NAMES] if self.out else []
        finals += [self.metrics] if self.metrics else []
        for final in finals:  # --metrics outside --out: a file of its own
            if self.path(final).parent != self.stage:
                os.replace(self.path(final), final)
        if self.stage is None:
            return
        if not (self._link_the_rest() and exchange(self.stage, self.out)):
            for final in finals:  # one file at a time (see NOTE [whole runs])
                if self.path(final).parent == self.stage:
                    os.replace(self.path(final), final)
        self.discard()

    def discard(self):
        """Remove what the run wrote (a run that failed leaves --out as it was)."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        for final in [self.metrics] if self.metrics else []:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(final))

    def _link_the_rest(self) -> bool:
        """Hard-link the other files of --out into the stage, so that the swap
        keeps them; False if --out holds something that cannot be linked."""
        for entry in os.scandir(self.out):
            target = self.stage / entry.name
            if target.exists() or target.is_symlink():
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_file():
                os.link(entry.path, target)
            else:
                return False
        return True


def _report(cfg, model, data, loss_fn, ranks) -> dict:
    """The startup report: predicted peak per rank, and the largest global batch that fits the memory budget.
    Its probes run on set-aside RNG and data generators, so the report does not change the training."""
    t, device = cfg["training"], ranks.device
    saved = {k: g.get_state() for k, g in data.generators.items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # the rank's share as the steps take it: a slice, which holds the global batch
        share = distributed.local(_to(data.batch("train", t["batch_size"]), device), ranks)
        predicted = simulate(model, share, loss_fn, None, distributed=ranks.spec).peak_bytes
        memory_budget = Budget.parse(t["memory_budget"] or "auto").bytes(predicted, device)
        recommended, _ = largest_batch(
            model, lambda b: _to(data.batch("train", b), device), loss_fn, None, memory_budget, distributed=ranks.spec
        )
    for k, g in data.generators.items():
        g.set_state(saved[k])
    report = {
        "model": cfg["model"]["name"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "precision": t["precision"],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gradient_checkpointing": checkpointing_status(model),
        "batch_size": t["batch_size"],
        "distributed": ranks.kind,
        "world_size": ranks.world,
        "predicted_peak_bytes": predicted,
        "memory_budget_bytes": memory_budget,
        "memory_budget_source": "training.memory_budget" if t["memory_budget"] else "free device memory less 10%",
        "recommended_batch_size": recommended * ranks.world,
    }
    if hasattr(data, "unigram_entropy"):
        report["unigram_entropy"] = data.unigram_entropy
    return report


@torch.no_grad()
def evaluate(model, data, loss_fn, t, ranks) -> float:
    model.eval()
    losses = [
        loss_fn(model, distributed.local(_to(data.batch("val", t["batch_size"]), ranks.device), ranks)).item()
        for _ in range(t["eval_iters"])
    ]
    model.train()
    return distributed.reduce(sum(losses) / len(losses), ranks)
