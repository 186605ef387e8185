"""A model's `gradient_checkpointing` setting, as the recipes' configs give it."""
from __future__ import annotations

from torch import nn

from memfit.errors import MemfitError

OFF = {"false", "off", "none", "no", "0"}
ON = {"true", "on", "yes", "1"}


def checkpointing(module: nn.Module, value, blocks=None) -> nn.Module:
    """Apply a `gradient_checkpointing` setting to `module`: False/True
    (every block), a strategy string, a `memfit.Plan`, or "plan:FILE.json".
    Budgets (`budget:60%`) need a batch to plan with: `memfit train` and
    `memfit.apply(model, budget=..., batch=..., loss_fn=...)` take them."""
    from memfit.wrapping import apply, remove
    from memfit.planner import Plan

    if isinstance(value, dict):  # {chain: setting}, each one of the settings below
        settings = {k: _setting(v) for k, v in value.items()}
        value = {k: v if isinstance(v, str) else "blocks" if v else "none" for k, v in settings.items()}
        return apply(module, value, blocks=blocks)
    value = _setting(value)
    if value is None or value is False:
        return remove(module)
    if value is True:
        value = "blocks"
    if isinstance(value, str) and value.startswith("plan:") and value.endswith(".json"):
        value = Plan.load(value[len("plan:"):])
    if isinstance(value, str) and value.startswith(("budget:", "plan:")):
        raise MemfitError(f"gradient_checkpointing {value!r} needs a batch to plan with; use it with memfit train, "
                          f"or call memfit.apply(model, budget=..., batch=..., loss_fn=...).")
    return apply(module, value, blocks=blocks)


def _setting(value):
    """True, False, None, a strategy string, a Plan or a list of units, from a config's value."""
    from memfit.planner import Plan

    if isinstance(value, str):
        value = value.strip()
        if value.lower() in OFF | ON:
            value = value.lower() in ON
    elif isinstance(value, int):  # bools, and YAML's 0 / 1
        value = bool(value)
    elif value is not None and not isinstance(value, (Plan, list)):
        raise MemfitError(f"gradient_checkpointing {value!r} is not understood; use true, false, a strategy such "
                          f"as blocks or selective, or budget:60%.")
    return value
