"""memfit inside the trainers people already use.

    from memfit.integrations.transformers import MemfitCallback   # transformers.Trainer
    from memfit.integrations.lightning import MemfitCallback      # lightning.pytorch.Trainer

Both callbacks do the same three things through `Session`: on the first
training batch they plan for the budget with the trainer's own loss and
apply the plan (NOTE [first batch]); they report what they chose; and they
measure every step's peak with memfit's tracker. A plain loop, accelerate's
included, needs none of this: `memfit.apply(model, budget=..., batch=...,
loss_fn=...)` before `accelerator.prepare` (see the README).

NOTE [first batch]
The plan is made on the batch the trainer is about to train on, moved to
the device and collated as the trainer does it, with the loss the trainer
computes, and before its first forward: nothing has run yet, so the run is
the run without memfit, step for step. Planning leaves no trace in it: the
planner runs its steps on copies, and times ops for its time model on
constant tensors of its own (NOTE [time model]), so the random numbers the
trainer draws next (dropout, data order) are the ones it would have drawn.
With several processes, rank 0 plans and sends the plan to every rank, so
every rank recomputes the same blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from memfit.core import schedule
from memfit.core.memory import GB, fmt_bytes, track_memory
from memfit.core.schedule import Budget, Plan
from memfit.core.wrapping import applied_strategy, wrapped_blocks
from memfit.errors import MemfitError
from memfit.planning.distributed import Ranks, on_main
from memfit.planning.planner import apply, plan

__all__ = ["Session", "SessionCallback", "training_loss", "accumulation_warning"]


def _ranks(kind: str) -> Ranks:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(kind, dist.get_rank(), dist.get_world_size())
    return Ranks()


class Session:
    """One training run's memfit: `prepare` plans and applies on the first
    batch, `start` and `stop` measure each step's peak (bytes, in `peaks`)."""

    def __init__(self, budget=None, strategy=None, cost="time", monitor=True):
        if budget is not None and strategy is not None:
            raise MemfitError("give budget= (memfit plans for it) or strategy= (applied as given), not both.")
        if cost not in ("time", "flops"):
            raise MemfitError(f"unknown cost {cost!r}; use time (the device's time model) or flops (deterministic).")
        # a bad budget or strategy fails here, before the trainer starts
        self.schedule = schedule.parse(
            Budget.parse("auto" if budget is None else budget) if strategy is None else strategy
        )
        self.strategy, self.cost, self.monitor = strategy, cost, monitor
        self.plan: Plan | None = None
        self.report: str | None = None
        self.peaks: list[int] = []
        self._tracking = None

    @property
    def prepared(self) -> bool:
        return self.report is not None

    def prepare(self, model, batch, loss_fn, optimizer=None, kind="ddp") -> str:
        """Plan for the budget (or resolve the strategy) on `batch`, apply it
        to `model` on every rank, and return the startup report. `kind`:
        how several processes will train it, "ddp" or "fsdp" (sharded
        after this, with `memfit.planning.distributed.shard`)."""
        if _sharded(model):
            raise MemfitError(
                "the model is already sharded by FSDP, and memfit must be applied before sharding; "
                "call memfit.apply(model, ...) before the trainer wraps the model."
            )
        ranks = _ranks(kind)
        opt_class = type(getattr(optimizer, "optimizer", optimizer)) if optimizer is not None else None

        def choose():
            chosen = self.schedule.strategy
            if self.schedule.budget is not None:
                chosen = plan(
                    model,
                    batch,
                    loss_fn,
                    self.schedule.budget,
                    cost=self.cost,
                    optimizer=opt_class,
                    distributed=ranks.spec,
                )
            return chosen.to_json() if isinstance(chosen, Plan) else chosen

        chosen = on_main(choose, ranks)
        if isinstance(chosen, str) and chosen.lstrip().startswith("{"):
            chosen = self.plan = Plan.from_json(chosen)
        apply(model, chosen)
        self.report = _report(model, self.plan, self.strategy, ranks)
        return self.report

    def start(self, *objects) -> None:
        """Measure from now (`objects`: model, optimizer, batch, whose bytes are static)."""
        if self.monitor and self.prepared and self._tracking is None:
            self._tracking = track_memory(*objects)
            self._tracking.__enter__()

    def stop(self) -> int | None:
        """The peak since `start`, in bytes (None when nothing was measured)."""
        if self._tracking is None:
            return None
        self._tracking.__exit__(None, None, None)
        peak, self._tracking = self._tracking.tracker.peak_bytes, None
        self.peaks.append(peak)
        return peak

    def metrics(self, peak: int) -> dict:
        """The numbers the trainers log: the step's peak and the budget, in GB."""
        out = {"memory/peak": peak / GB}
        if self.plan is not None:
            out["memory/predicted_peak"] = self.plan.predicted_peak_bytes / GB
            out["memory/budget"] = self.plan.budget_bytes / GB
        return out


class SessionCallback:
    """Plan for `budget` ('60%' of the plain step's peak, '20GiB', 'auto': the
    device's free memory; the default) on the first batch and apply the
    plan; or apply `strategy` ('blocks', 'plan:FILE.json', ...) as given.
    `cost`: 'time' (the device's time model, the default) or 'flops'.
    `monitor`: measure each step's peak (on CPU this slows steps down).
    After training, `plan`, `report` and `peaks` (bytes per step) say what
    was chosen and measured."""

    def __init__(self, budget=None, strategy=None, cost="time", monitor=True):
        self.session = Session(budget, strategy, cost, monitor)

    plan = property(lambda self: self.session.plan)
    report = property(lambda self: self.session.report)
    peaks = property(lambda self: self.session.peaks)


def accumulation_warning(steps: int) -> str | None:
    """What to say when gradients are accumulated over `steps` batches (None for 1)."""
    if steps <= 1:
        return None
    return (
        f"memfit: gradients are accumulated over {steps} batches; the plan predicts a step without "
        f"accumulation, and the batches after the first also hold the gradients (one more copy of the "
        f"trainable parameters) through their forward, which the predicted peak does not count."
    )


def training_loss(output):
    """The loss in what a model or training step returned: a tensor, a dict's
    or a ModelOutput's `loss`, or a tuple's first element."""
    if isinstance(output, dict):
        output = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise MemfitError(
            f"the training step returned {type(output).__name__}, not a loss; memfit plans with the "
            f"loss it returns: a tensor, or a dict or model output with a 'loss'."
        )
    return output


def _report(model, chosen_plan, strategy, ranks) -> str:
    wrapped = wrapped_blocks(model)
    total = sum(a["n_blocks"] for m in model.modules() if (a := applied_strategy(m)))
    head = f"memfit: checkpointing {len(wrapped)} of {total} blocks"
    if ranks.world > 1:
        head += f" on each of {ranks.world} {ranks.kind.upper()} processes (planned on rank 0, per rank)"
    if chosen_plan is None:
        return f"{head}, strategy {strategy}"
    return f"{head}, budget {fmt_bytes(chosen_plan.budget_bytes)}:\n{chosen_plan}"


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())
