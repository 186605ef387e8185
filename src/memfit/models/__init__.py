"""The seeds' reference models, in plain PyTorch. Each module has `build(size,
batch_size, seed) -> (model, batch, loss_fn)` and a `SIZES` table."""
from memfit.models import gpt, mlp, resnet_se

REGISTRY = {"gpt": gpt, "mlp": mlp, "resnet-se": resnet_se}
DEFAULT = "gpt"
