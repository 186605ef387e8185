"""memfit.models: the built-in models, and a user's factory, loaded with what they take."""

import sys
import textwrap

import pytest
import torch

from memfit import MemfitError, models
from memfit.errors import scalar_loss


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_each_built_in_model_loads_at_its_batch_and_seed(name):
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=2, seed=3)
    again, _, _ = models.load(name, size="tiny", batch_size=2, seed=3)
    other, _, _ = models.load(name, size="tiny", batch_size=2, seed=4)
    first = next(model.parameters())
    assert torch.equal(first, next(again.parameters())) and not torch.equal(first, next(other.parameters()))
    lead = next(t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor))
    assert lead.shape[0] == 2 and scalar_loss(loss_fn, model, batch).dim() == 0


def test_a_factory_gets_only_the_arguments_it_takes(tmp_path, monkeypatch):
    (tmp_path / "takes_some.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        seen = {}

        def make(batch_size=5):
            seen["batch_size"] = batch_size
            return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), torch.randn(batch_size, 2), \\
                lambda m, b: m(b).sum()
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, batch, _ = models.load("takes_some:make", size="large", batch_size=7, seed=1)
    assert batch.shape == (7, 2) and sys.modules["takes_some"].seen == {"batch_size": 7}


def test_unknown_names_and_sizes_say_what_exists():
    with pytest.raises(MemfitError, match="built-in models: gpt, mlp, resnet-se, vit-jepa, video"):
        models.load("gpt3")
    with pytest.raises(MemfitError, match="unknown size 'huge' for model 'gpt'; sizes: "):
        models.load("gpt", size="huge")
