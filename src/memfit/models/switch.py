"""A model's `gradient_checkpointing` setting, as the recipes' configs give it."""

from __future__ import annotations

from torch import nn

from memfit.core import schedule
from memfit.core.wrapping import wrap
from memfit.errors import MemfitError


def checkpointing(module: nn.Module, value, blocks=None) -> nn.Module:
    """Apply a `gradient_checkpointing` setting to `module`: any spelling
    `memfit.core.schedule.parse` reads. Budgets (`budget:60%`) need a batch to
    plan with: `memfit train` and `memfit.apply(model, "plan:60%", batch=...,
    loss_fn=...)` take them."""
    s = schedule.parse(False if value is None else value)  # YAML's null: off
    if s.budget is not None:
        raise MemfitError(
            f"gradient_checkpointing {value!r} needs a batch to plan with; use it with memfit train, "
            f"or call memfit.apply(model, {str(s)!r}, batch=..., loss_fn=...)."
        )
    return wrap(module, s.strategy, blocks=blocks)
