"""torchvision and timm models as their users build them (their own
constructors, random weights, small inputs; nothing downloaded), for
tests/test_zoo.py and benchmarks/zoo.py. Each builder returns (model, batch,
loss_fn). torchvision and timm need a torch other than the one the README
pins; see "The model zoos" in the README for the command that installs them.

Drop path and dropout are on wherever the model has them, so the random
numbers a recompute draws are checked too."""

import torch
from torch import nn

B, SCALE = 2, 1  # a benchmark may raise them before building: the batch, and the images' side (times SCALE)


def _image(size=32, channels=3, seed=1):
    return torch.randn(B, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _classify(model, size=32):
    labels = torch.arange(B) % 10
    return model, _image(size), lambda m, x: nn.functional.cross_entropy(m(x), labels)


def _tv(name, size=32, **kw):
    def build():
        import torchvision

        return _classify(getattr(torchvision.models, name)(num_classes=10, **kw), size * SCALE)

    return build


def _timm(name, size=32, fixed=False, **kw):
    """`fixed`: the model is built for its image size (`img_size=`)."""

    def build():
        import timm

        extra = {"img_size": size * SCALE} if fixed else {}
        return _classify(timm.create_model(name, pretrained=False, num_classes=10, **kw, **extra), size * SCALE)

    return build


def tv_vit():
    from torchvision.models import VisionTransformer

    return _classify(
        VisionTransformer(
            image_size=32 * SCALE,
            patch_size=8,
            num_layers=3,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            dropout=0.1,
            attention_dropout=0.1,
            num_classes=10,
        ),
        32 * SCALE,
    )


def tv_swin():
    from torchvision.models import SwinTransformer

    return _classify(
        SwinTransformer(
            patch_size=[2, 2],
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 2],
            window_size=[4, 4],
            stochastic_depth_prob=0.2,
            num_classes=10,
        ),
        32 * SCALE,
    )


def tv_video():
    """3-D convolutions over a short clip."""
    from torchvision.models.video import mc3_18

    clip = torch.randn(B, 3, 4, 16 * SCALE, 16 * SCALE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(B) % 10
    return mc3_18(num_classes=10), clip, lambda m, x: nn.functional.cross_entropy(m(x), labels)


def tv_segmentation():
    """A dict output ({"out": ...}) from a MobileNetV3 backbone."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    side = 32 * SCALE
    target = torch.arange(B * side * side).reshape(B, side, side) % 3
    return model, _image(side), lambda m, x: nn.functional.cross_entropy(m(x)["out"], target)


def tv_raft():
    """Optical flow: the update block is called once per iteration."""
    from torchvision.models.optical_flow import raft_small

    g = torch.Generator().manual_seed(1)
    pair = (
        torch.randn(1, 3, 128, 128, generator=g),
        torch.randn(1, 3, 128, 128, generator=g),
    )  # 128: the least RAFT takes
    return raft_small(weights=None), pair, lambda m, x: sum(f.square().mean() for f in m(*x, num_flow_updates=3))


TORCHVISION = {
    "tv resnet18": _tv("resnet18"),
    "tv mobilenet_v3_small (SE, in-place hardswish)": _tv("mobilenet_v3_small"),
    "tv efficientnet_b0 (SE, stochastic depth)": _tv("efficientnet_b0", stochastic_depth_prob=0.2),
    "tv densenet121 (dense, ModuleDict)": _tv("densenet121"),
    "tv regnet_x_400mf": _tv("regnet_x_400mf"),
    "tv convnext_tiny (stages)": _tv("convnext_tiny", stochastic_depth_prob=0.1),
    "tv swin (stages, windows)": tv_swin,
    "tv vit": tv_vit,
    "tv mc3_18 (video, 3-D conv)": tv_video,
    "tv lraspp (segmentation, dict output)": tv_segmentation,
    "tv raft_small (optical flow, update block called per iteration)": tv_raft,
}

TIMM = {
    "timm resnet26d": _timm("resnet26d", drop_path_rate=0.1),
    "timm efficientnet_b0 (SE, in-place SiLU)": _timm("efficientnet_b0", drop_path_rate=0.2),
    "timm mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "timm regnetx_002 (blocks as attributes)": _timm("regnetx_002", drop_path_rate=0.1),
    "timm densenet121 (dense)": _timm("densenet121"),
    "timm vit_tiny (drop path)": _timm("vit_tiny_patch16_224", fixed=True, patch_size=8, drop_path_rate=0.1),
    "timm eva02_tiny (rotary, SwiGLU)": _timm("eva02_tiny_patch14_224", size=28, fixed=True, drop_path_rate=0.1),
    "timm convnext_atto": _timm("convnext_atto", drop_path_rate=0.1),
    "timm mixer_s16 (MLP-Mixer)": _timm("mixer_s16_224", fixed=True, drop_path_rate=0.1),
    "timm mobilevit_xxs (hybrid)": _timm("mobilevit_xxs", size=64),
    "timm fastvit_t8 (hybrid)": _timm("fastvit_t8", size=64, drop_path_rate=0.1),
    "timm poolformerv2_s12 (MetaFormer)": _timm("poolformerv2_s12", drop_path_rate=0.1),
    "timm coatnet_nano (conv-attention)": _timm("coatnet_nano_rw_224", size=64, fixed=True, drop_path_rate=0.1),
}

ZOO = {**TORCHVISION, **TIMM}


def own_checkpointing(m) -> bool:
    """Turn on the model's own gradient checkpointing: timm's `set_grad_checkpointing`, torchvision DenseNet's
    `memory_efficient` layers; False where it has none."""
    if hasattr(m, "set_grad_checkpointing"):
        try:
            m.set_grad_checkpointing(True)
            return True
        except (AssertionError, NotImplementedError, AttributeError):
            return False
    layers = [layer for layer in m.modules() if hasattr(layer, "memory_efficient")]
    for layer in layers:
        layer.memory_efficient = True
    return bool(layers)
