"""memfit's built-in models as recipes: per model, its architecture keys, factory,
data, loss and what runs after each optimizer step.

Every data source draws from its own generators, one per split
(`.generators`), so the training loop can set them aside while it builds
probe batches for the startup report: the batches a run trains on do not
depend on what was probed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import torch

from memfit.errors import MemfitError
from memfit.models import gpt, mlp, resnet_se, video, vit_jepa


class CharData:
    """Character-level text: the packaged corpus, or `path`. The
    last 10% is held out for validation."""

    def __init__(self, path, block_size, seed=0):
        if path is None:
            text = resources.files("memfit").joinpath("data/corpus.txt").read_text()
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise MemfitError(
                    f"cannot read data file {path}: {getattr(e, 'strerror', None) or e}; "
                    f"give a UTF-8 text file as data.path."
                ) from None
        if len(text) < 10 * (block_size + 1):
            raise MemfitError(
                f"data file {path} has {len(text)} characters; the GPT recipe needs at least "
                f"{10 * (block_size + 1)} for sequences of {block_size}."
            )
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        n = int(len(data) * 0.9)
        self.splits = {"train": data[:n], "val": data[n:]}
        self.block_size = block_size
        self.generators = {s: torch.Generator().manual_seed(seed + i) for i, s in enumerate(self.splits)}
        counts = Counter(text)
        self.unigram_entropy = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())
        self.model_overrides = {"vocab_size": len(self.chars)}

    def batch(self, split, batch_size):
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size - 1, (batch_size,), generator=self.generators[split])
        x = torch.stack([data[i : i + self.block_size] for i in starts.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + self.block_size] for i in starts.tolist()])
        return x, y


class Generated:
    """Data from a model module's `batch(size_or_config, batch_size, seed)`,
    a new seed each call, different per split."""

    def __init__(self, make, seed=0):
        self.make = make
        self.generators = {"train": torch.Generator().manual_seed(seed), "val": torch.Generator().manual_seed(seed + 1)}
        self.model_overrides = {}

    def batch(self, split, batch_size):
        return self.make(batch_size, int(torch.randint(2**31, (1,), generator=self.generators[split])))


class Clips:
    """A fixed set of synthetic clips (512 to train on, 128 to validate)."""

    def __init__(self, cfg, seed=0):
        self.splits = {"train": video.moving_clips(512, cfg, seed), "val": video.moving_clips(128, cfg, seed + 1)}
        self.generators = {"train": torch.Generator().manual_seed(seed), "val": torch.Generator().manual_seed(seed + 1)}
        self.model_overrides = {}

    def batch(self, split, batch_size):
        clips, labels = self.splits[split]
        i = torch.randint(len(labels), (batch_size,), generator=self.generators[split])
        return clips[i], labels[i]


def _mlp_data(arch, data_cfg, seed):
    centres = torch.randn(arch["n_out"], arch["n_in"], generator=torch.Generator().manual_seed(12345))

    def make(batch_size, s):
        g = torch.Generator().manual_seed(s)
        y = torch.randint(arch["n_out"], (batch_size,), generator=g)
        return centres[y] + torch.randn(batch_size, arch["n_in"], generator=g), y

    return Generated(make, seed)


@dataclass
class Recipe:
    architecture: type | Callable  # a config dataclass, or a model class whose arguments are the keys
    create: Callable  # (architecture dict, gradient_checkpointing) -> model
    loss_fn: Callable
    data: Callable  # (architecture dict, data config, seed) -> data with .batch(split, n)
    after_step: Callable = field(default=lambda model, training: None)


RECIPES = {
    "gpt": Recipe(
        gpt.GPTConfig,
        gpt.create_gpt,
        gpt.loss_fn,
        lambda arch, data, seed: CharData(data["path"], arch["block_size"], seed),
    ),
    "mlp": Recipe(mlp.MLP, mlp.create_mlp, mlp.loss_fn, _mlp_data),
    "resnet-se": Recipe(
        resnet_se.ResNetSE,
        resnet_se.create_resnet_se,
        resnet_se.loss_fn,
        lambda arch, data, seed: Generated(lambda n, s: resnet_se.batch("small", n, s), seed),
    ),
    "vit-jepa": Recipe(
        vit_jepa.JEPAConfig,
        vit_jepa.create_jepa,
        vit_jepa.loss_fn,
        lambda arch, data, seed: Generated(lambda n, s: vit_jepa.batch(vit_jepa.JEPAConfig(**arch), n, s), seed),
        lambda model, training: model.update_target(training["ema_momentum"]),
    ),
    "video": Recipe(
        video.VideoConfig,
        video.create_video,
        video.loss_fn,
        lambda arch, data, seed: Clips(video.VideoConfig(**arch), seed),
    ),
}
