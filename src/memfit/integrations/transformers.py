"""memfit for the Hugging Face Trainer.

    from memfit.integrations.transformers import MemfitCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[MemfitCallback(budget="60%")])

Before the first optimizer step, on the first training batch, the callback
plans for the budget with the model's own loss (`model(**batch).loss`, with
the arguments the Trainer passes) and applies the plan (NOTE [first batch]
in `memfit.integrations`). The startup report goes to the Trainer's logger
(shown with `log_level="info"`); each step's peak, measured by memfit's
tracker, goes into the Trainer's logs as `memory/peak` (GB, the largest
since the last log) beside `memory/predicted_peak` and `memory/budget`. With
`gradient_checkpointing=True` as well, memfit replaces the model's own
checkpointing, and says so once.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from memfit.integrations import SessionCallback, accumulation_warning, training_loss

__all__ = ["MemfitCallback"]

logger = logging.get_logger("transformers.trainer")


def model_loss(model, batch):
    """The loss of `model` on `batch` = (args, kwargs), as the Trainer calls it."""
    args, kwargs = batch
    return training_loss(model(*args, **kwargs))


def _own_checkpointing_off(model) -> bool:
    """Turn the model's own gradient checkpointing off; True when it was on."""
    for on, off in (
        ("is_activation_checkpointing", "activation_checkpointing_disable"),
        ("is_gradient_checkpointing", "gradient_checkpointing_disable"),
    ):
        if hasattr(type(model), on) or hasattr(model, off):
            if getattr(model, on, False):
                getattr(model, off)()
                return True
            return False
    return False


class MemfitCallback(SessionCallback, TrainerCallback):
    __doc__ = SessionCallback.__doc__

    def __init__(self, budget=None, strategy=None, cost="time", monitor=True):
        super().__init__(budget, strategy, cost, monitor)
        self._hook = self._optimizer = None
        self._planning = False
        self._since_log: list[int] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._optimizer = optimizer
        if _own_checkpointing_off(model):
            logger.warning(
                "memfit: gradient_checkpointing=True is off for this run: memfit's callback "
                "checkpoints the model instead."
            )
        if (said := accumulation_warning(args.gradient_accumulation_steps)) is not None:
            logger.warning(said)
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._training_forward, with_kwargs=True)

    def _training_forward(self, module, args, kwargs):
        """Before each training forward: plan on the first; measure from the first of each step."""
        if self._planning or not (module.training and torch.is_grad_enabled()):
            return  # memfit's own steps while it plans, or evaluation
        batch = (args, kwargs)
        if not self.session.prepared:
            self._planning = True
            try:
                logger.info(self.session.prepare(module, batch, model_loss, self._optimizer))
            finally:
                self._planning = False
        self.session.start(module, self._optimizer, batch)

    def on_step_end(self, args, state, control, **kwargs):
        peak = self.session.stop()
        if peak is not None:
            self._since_log.append(peak)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._since_log or logs is None or "loss" not in logs:
            return
        memory = self.session.metrics(max(self._since_log))
        self._since_log.clear()
        logs.update(memory)
        if state.log_history:
            state.log_history[-1].update(memory)

    def on_train_end(self, args, state, control, **kwargs):
        self.session.stop()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
