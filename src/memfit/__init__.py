"""memfit: make PyTorch training fit in memory by recomputing activations,
and prove it is the same training."""

from memfit.core.blocks import find_blocks, find_chains
from memfit.core.checkpointing import checkpoint
from memfit.core.memory import track_memory
from memfit.core.schedule import Plan
from memfit.core.wrapping import remove, wrapped_blocks
from memfit.errors import MemfitError
from memfit.planning.planner import apply, plan  # apply: plans too (see memfit.planning.planner.apply)
from memfit.planning.profiling import profile
from memfit.tools.verification import verify

__version__ = "0.1.0"
__all__ = [
    "checkpoint",
    "apply",
    "remove",
    "wrapped_blocks",
    "find_blocks",
    "find_chains",
    "track_memory",
    "plan",
    "Plan",
    "profile",
    "verify",
    "MemfitError",
]
