"""memfit: make PyTorch training fit in memory by recomputing activations."""
from memfit.checkpoint import checkpoint
from memfit.errors import MemfitError

__version__ = "0.1.0"
__all__ = ["checkpoint", "MemfitError"]
