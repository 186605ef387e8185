"""memfit for Lightning.

    from memfit.integrations.lightning import MemfitCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[MemfitCallback(budget="60%")])

On the first training batch, before its step, the callback plans for the
budget with the LightningModule's `training_step` loss (under the
Trainer's precision, with `self.log` silenced while planning) and applies
the plan (NOTE [first batch] in `memfit.integrations`). The startup report
is printed on rank 0; each step's peak, measured by memfit's tracker, is
logged as `memory/peak` (GB) beside `memory/predicted_peak` and
`memory/budget`. Under the DDP strategies memfit checkpoints the module
inside DDP.

Under `ModelParallelStrategy` (FSDP2) memfit must be applied before the
module is sharded in `configure_model` (NOTE [order with FSDP2] in
`memfit.planning.distributed`), so the callback plans in `setup`, on the first batch
of the training dataloader (drawn without touching the random numbers the
training draws), for one rank of an FSDP2 run. Shard with
`memfit.integrations.lightning.fully_shard(self, mesh)` in `configure_model`:
one FSDP group per memfit unit, as the plan predicted. Lightning's FSDP1
strategy (`strategy="fsdp"`, GPU only) wraps the module before any hook
memfit could use; the callback stops at `setup` with a sentence saying so.

NOTE [gradients before the forward]
Lightning zeroes the gradients inside its closure, after `training_step`'s
forward and before the backward, so the last step's gradients are alive
through the forward: one more copy of the parameters at the peak, which
the plan (like the Hugging Face Trainer, which zeroes them right after the
optimizer step) does not hold. The callback frees them before the forward
of each step in which Lightning would zero them anyway (the first batch of
an accumulation window): the same training, a lower peak, the one planned.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memfit.errors import MemfitError
from memfit.integrations import SessionCallback, accumulation_warning, training_loss
from memfit.planning.distributed import shard

__all__ = ["MemfitCallback", "fully_shard"]


fully_shard = shard  # for configure_model under ModelParallelStrategy: one FSDP2 group per memfit unit


def step_loss(trainer, batch_idx):
    """The loss of `training_step` as the planner calls it: `loss(module, batch)`."""

    def loss(module, batch):
        if module._trainer is None:  # the planner's copy of the module
            module._trainer = trainer
        with trainer.precision_plugin.train_step_context():
            return training_loss(module.training_step(batch, batch_idx))

    return loss


@contextlib.contextmanager
def _quiet(module):
    """`self.log` and `self.log_dict` do nothing while memfit plans."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def _first_batch(trainer):
    """The first training batch, on the device, drawn as the training loop will draw it again."""
    with torch.random.fork_rng(devices=[]):
        loader = trainer.fit_loop._data_source.dataloader()
        batch = next(iter(loader))
    return trainer.strategy.batch_to_device(batch)


class MemfitCallback(SessionCallback, Callback):
    __doc__ = SessionCallback.__doc__

    def _prepare(self, trainer, module, batch, batch_idx, kind="ddp"):
        if not module.automatic_optimization:
            raise MemfitError(
                "MemfitCallback plans with the loss training_step returns, which needs automatic "
                "optimization; with manual optimization call memfit.apply(self, ...) in setup()."
            )
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        with _quiet(module):
            report = self.session.prepare(module, batch, step_loss(trainer, batch_idx), optimizer, kind)
        rank_zero_info(report)
        if (said := accumulation_warning(trainer.accumulate_grad_batches)) is not None:
            rank_zero_warn(said)

    def setup(self, trainer, pl_module, stage):
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            raise MemfitError(
                "Lightning's FSDPStrategy shards the module before memfit can be applied; use "
                "ModelParallelStrategy and memfit.integrations.lightning.fully_shard(self, mesh) in "
                "configure_model."
            )
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy) and not self.session.prepared:
            mesh = trainer.strategy.device_mesh
            if mesh["data_parallel"].size() != mesh.size():
                raise MemfitError(
                    f"memfit plans FSDP2 data parallelism, and this ModelParallelStrategy has tensor "
                    f"parallelism of {mesh['tensor_parallel'].size()}; use "
                    f"ModelParallelStrategy(data_parallel_size={mesh.size()}, tensor_parallel_size=1)."
                )
            self._prepare(trainer, pl_module, _first_batch(trainer), 0, kind="fsdp")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.session.prepared:
            self._prepare(trainer, pl_module, batch, batch_idx)
        if batch_idx % trainer.accumulate_grad_batches == 0:  # NOTE [gradients before the forward]
            for optimizer in trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
        self.session.start(pl_module, *trainer.optimizers, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        peak = self.session.stop()
        if peak is not None:
            pl_module.log_dict(self.session.metrics(peak), on_step=True, on_epoch=False)

    def on_exception(self, trainer, pl_module, exception):
        self.session.stop()
