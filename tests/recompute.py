"""What a checkpointed step recomputed, so that a test of sameness also fails
when a strategy wraps nothing or nothing is recomputed."""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from memfit.core import ondemand
from memfit.core.strategies import KEEP, OFFLOAD


@dataclass
class Recomputed:
    forwards: int = 0  # module calls made while backward runs: a recompute calls the block's modules again
    replays: int = 0  # ops evaluated again by recompute on demand (`lazy:` modes)

    @property
    def anything(self) -> bool:
        return self.forwards + self.replays > 0


@contextlib.contextmanager
def counting():
    """Count what the steps run inside recompute (every model, every thread's backward)."""
    seen, evaluate = Recomputed(), ondemand._evaluate

    def pre(module, args):
        if torch._C._current_graph_task_id() != -1:
            seen.forwards += 1

    def spy(ref):
        seen.replays += ref.node.value is None
        return evaluate(ref)

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    ondemand._evaluate = spy
    try:
        yield seen
    finally:
        handle.remove()
        ondemand._evaluate = evaluate


def recomputes(strategy) -> bool:
    """Whether `strategy` (a strategy string, a `Plan` or units) recomputes anything: every strategy string but
    `none` and `offload` recomputes some block of every chain."""
    if isinstance(strategy, str):
        return strategy not in ("none", "offload")
    return any(u.mode not in (KEEP, OFFLOAD) for u in getattr(strategy, "units", strategy))
