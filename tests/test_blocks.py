"""find_blocks on the repo's models and on the layouts of common libraries."""

import pytest
import torch
from torch import nn

from memfit import MemfitError
from memfit.core.blocks import find_blocks
from memfit.models import REGISTRY


class Layer(nn.Module):
    def __init__(self, heads=0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if heads:  # an inner ModuleList that outnumbers the layers
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(heads)])


def names(model, blocks=None):
    return [n for n, _ in find_blocks(model, blocks)]


@pytest.mark.parametrize(
    "model, prefix, count", [("gpt", "transformer.h.", 4), ("mlp", "hidden.", 4), ("resnet-se", "blocks.", 3)]
)
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
    node.add_module(
        leaf,
        container(
            *([Layer(**kw) for _ in range(n)],) if container is nn.ModuleList else [Layer(**kw) for _ in range(n)]
        ),
    )
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


def conv_norm_act(cin, cout, stride=1, act=True):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True) if act else nn.Identity(),
    )


class Bottleneck(nn.Module):
    """A block whose layers are attributes of one kind (conv-norm-act units, as timm's RegNet writes them)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.conv2 = conv_norm_act(cin, cout, stride), conv_norm_act(cout, cout, act=False)
        self.shortcut = conv_norm_act(cin, cout, stride, act=False) if stride > 1 or cin != cout else None

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        y += x if self.shortcut is None else self.shortcut(x)
        return y.relu_()


class RegStage(nn.Module):
    """timm's RegNet stage: its blocks added as attributes b1, b2, ... with add_module."""

    def __init__(self, depth, cin, cout):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout, 2 if i == 0 else 1))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class RegNet(nn.Module):
    """timm's layout: stem, stages s1.. as attributes (one of depth 1), a final conv and a head."""

    def __init__(self, depths=(1, 2, 3)):
        super().__init__()
        self.stem = conv_norm_act(3, 4)
        widths = [4, 8, 8, 16]
        for k, d in enumerate(depths):
            self.add_module(f"s{k + 1}", RegStage(d, widths[k], widths[k + 1]))
        self.final_conv = conv_norm_act(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for m in list(self.children())[:-1]:
            x = m(x)
        return self.head(x.mean((2, 3)))


class LoraLinear(nn.Module):
    """peft's LoRA wrapper: a linear map beside two more, held in dicts; a layer, not a block."""

    def __init__(self, n):
        super().__init__()
        self.base_layer = nn.Linear(n, n)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, 2)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, n)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class LoraLayer(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.up, self.down = nn.LayerNorm(n), *(LoraLinear(n) for _ in range(5))

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.relu(self.up(self.q(h) * self.k(h) + self.v(h))))


def test_blocks_held_as_attributes_form_a_chain():
    """timm's RegNet: blocks b1, b2, ... of stages s1, s2, ...; a stage of one block joins the chain; the stem,
    the final conv and each block's conv-norm-act units are layers, not blocks."""
    assert names(RegNet()) == ["s1.b1", "s2.b1", "s2.b2", "s3.b1", "s3.b2", "s3.b3"]
    layers = nn.Module()
    layers.layers = nn.ModuleList([LoraLayer() for _ in range(3)])
    assert names(layers) == ["layers.0", "layers.1", "layers.2"]  # not the LoRA-wrapped linear maps inside
    twins = nn.Module()
    twins.add_module("first", LoraLayer())
    twins.add_module("second", LoraLayer())
    assert names(twins) == ["first", "second"]


def test_blocks_in_a_module_dict():
    m = nn.Module()
    m.blocks = nn.ModuleDict({f"layer{i}": Layer() for i in range(3)})
    assert names(m) == ["blocks.layer0", "blocks.layer1", "blocks.layer2"]
    assert names(m, "blocks") == ["blocks.layer0", "blocks.layer1", "blocks.layer2"]


def test_torchvision_layers_are_not_composite_blocks():
    """A Sequential of leaf modules (torchvision's Conv2dNormActivation) is a layer: two of them in a block do
    not make the block a stage of blocks."""
    m = nn.Module()
    m.stages = nn.Sequential(
        *(
            nn.Sequential(
                *(nn.Sequential(conv_norm_act(4, 4), conv_norm_act(4, 4), nn.Conv2d(4, 4, 1)) for _ in range(2))
            )
            for _ in range(2)
        )
    )
    assert names(m) == ["stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1"]


def test_a_plan_over_blocks_held_as_attributes_fits_and_predicts_the_peak():
    import memfit

    torch.manual_seed(0)
    model, batch = RegNet(), torch.randn(16, 3, 32, 32)

    def loss_fn(m, x):
        return m(x).square().mean()

    p = memfit.plan(model, batch, loss_fn, "92%", cost="flops")
    assert [b.name for b in p.blocks] == names(model)
    report = memfit.verify(model, batch, loss_fn, p, steps=1)
    assert report["passed"] and report["grads_bitwise_equal"]
    assert report["checkpointed"]["peak_bytes"] == p.predicted_peak_bytes <= p.budget_bytes


class DepthwiseSeparable(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.bn, self.pw = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.bn(self.dw(x))))


class InvertedResidual(DepthwiseSeparable):
    def forward(self, x):
        return x + super().forward(x)


def test_a_lone_block_beside_a_chains_containers_is_a_chain_of_one():
    """timm's EfficientNet: its first stage holds one depthwise-separable block, beside stages of inverted
    residuals; at the highest resolution it holds the most activations."""
    m = nn.Module()
    m.blocks = nn.Sequential(
        nn.Sequential(DepthwiseSeparable(4)),
        nn.Sequential(InvertedResidual(4), InvertedResidual(4)),
        nn.Sequential(InvertedResidual(4)),
    )
    assert names(m) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"]
