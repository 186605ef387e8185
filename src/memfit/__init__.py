"""memfit: make PyTorch training fit in memory by recomputing activations,
and prove it is the same training."""
from memfit.blocks import find_blocks, find_chains
from memfit.checkpointing import checkpoint
from memfit.errors import MemfitError
from memfit.memory import track_memory
from memfit.planner import apply, plan  # apply: plans too (see memfit.planner.apply)
from memfit.profiling import profile
from memfit.schedule import Plan
from memfit.verification import verify
from memfit.wrapping import remove, wrapped_blocks

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
