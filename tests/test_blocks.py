"""find_blocks on the repo's models and on the layouts of common libraries."""
import pytest
import torch
from torch import nn

from memfit import MemfitError
from memfit.blocks import find_blocks
from memfit.models import REGISTRY


class Layer(nn.Module):
    def __init__(self, heads=0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if heads:  # an inner ModuleList that outnumbers the layers
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(heads)])


def names(model, blocks=None):
    return [n for n, _ in find_blocks(model, blocks)]


@pytest.mark.parametrize("model, prefix, count", [
    ("gpt", "transformer.h.", 4), ("mlp", "hidden.", 4), ("resnet-se", "blocks.", 3)])
def test_builtin_models(model, prefix, count):
    m, _, _ = REGISTRY[model].build("tiny", batch_size=2)
    found = names(m)
    assert len(found) == count and all(n.startswith(prefix) for n in found)


def layout(path, n=6, container=nn.ModuleList, **kw):
    """A model whose blocks sit at `path`, e.g. 'model.layers', with a stem
    and a head beside them."""
    root = nn.Module()
    node = root
    *parents, leaf = path.split(".")
    for p in parents:
        child = nn.Module()
        node.add_module(p, child)
        node = child
    node.add_module(leaf, container(*([Layer(**kw) for _ in range(n)],) if container is nn.ModuleList
                                     else [Layer(**kw) for _ in range(n)]))
    root.add_module("head", nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
    return root


@pytest.mark.parametrize("path", ["transformer.h", "model.layers", "encoder.layer", "blocks"])
def test_common_layouts(path):
    assert names(layout(path)) == [f"{path}.{i}" for i in range(6)]


def test_sequential_blocks():
    assert names(layout("blocks", container=nn.Sequential)) == [f"blocks.{i}" for i in range(6)]


def test_outer_blocks_win_over_more_numerous_inner_ones():
    assert names(layout("transformer.h", n=3, heads=4)) == [f"transformer.h.{i}" for i in range(3)]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if stride > 1 else None

    def forward(self, x):
        return torch.relu(self.conv(x) + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.layer4 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64))
        self.fc = nn.Linear(64, 10)


def test_resnet_layers_form_one_chain():
    assert names(ResNet()) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_user_named_blocks():
    m = layout("encoder.layer", n=4)
    assert names(m, "encoder.layer") == [f"encoder.layer.{i}" for i in range(4)]
    assert names(m, "encoder.layer.*") == [f"encoder.layer.{i}" for i in range(4)]  # not their .fc children
    assert names(m, "encoder.layer.1|encoder.layer.3") == ["encoder.layer.1", "encoder.layer.3"]
    assert names(m, ["encoder.layer.0", "encoder.layer.2"]) == ["encoder.layer.0", "encoder.layer.2"]


def test_no_blocks_is_a_clear_error():
    with pytest.raises(MemfitError, match="no chain of repeated blocks"):
        find_blocks(nn.Linear(4, 4))
    with pytest.raises(MemfitError, match="no blocks match"):
        find_blocks(layout("blocks"), "decoder.*")
    with pytest.raises(MemfitError, match="no module named"):
        find_blocks(layout("blocks"), ["blocks.9"])
