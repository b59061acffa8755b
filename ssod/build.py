"""Builders that read the config: model, optimizer, learning-rate schedule, loss weights."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from ssod.config import MethodConfig, ModelConfig, TrainConfig
from ssod.engine import SemiSupervisedModel
from ssod.losses import loss_weights
from ssod.models.detector import build_detector
from ssod.models.polish import Polisher

METHODS = ("supervised", "soft_teacher", "polish_teacher")


def build_model(model_cfg: ModelConfig, method: MethodConfig, num_classes: int) -> SemiSupervisedModel:
    """Student: Faster R-CNN, plus the polishing networks when ``method.polish``."""
    if method.name not in METHODS:
        raise ValueError(f"method.name={method.name!r}: choose one of {METHODS}")
    if method.pseudo_labels not in ("teacher", "oracle"):
        raise ValueError(f"method.pseudo_labels={method.pseudo_labels!r}: choose teacher or oracle")
    detector = build_detector(model_cfg, num_classes)
    polisher = None
    if method.polish:
        polisher = Polisher(
            roi_pool=detector.roi_heads.box_roi_pool,
            in_channels=detector.backbone.out_channels,
            num_classes=num_classes,
            hidden=method.polish_hidden,
            vote_frac=method.rf_vote_frac,
            box_samples=method.reg_samples,
            box_scale=method.reg_scale,
            category_samples=tuple(method.cls_samples),
            category_scales=tuple(method.cls_scales),
            pos_iou=method.cls_pos_iou,
            rf_cls_thr=method.rf_cls_thr,
            det_score_thr=method.det_score_thr,
        )
    return SemiSupervisedModel(detector, polisher)


def apply_speed_settings(train: TrainConfig, model: nn.Module) -> nn.Module:
    """Set TF32 for CUDA float32 work (process-wide) and, if asked, the channels_last format of ``model``.

    ``train.tf32`` None leaves PyTorch's settings as they are. Call before copying the
    model into a teacher: the copy inherits the format.
    """
    if train.tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)
        torch.backends.cudnn.allow_tf32 = bool(train.tf32)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum over the trainable parameters, all of them decayed (as the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def lr_factor(step: int, warmup_iters: int, warmup_factor: float, lr_steps: list[int], gamma: float) -> float:
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, then x``gamma`` at each step."""
    warm = 1.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * gamma ** bisect.bisect_right(sorted(lr_steps), step)


def build_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    steps = list(train.lr_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_iters, train.warmup_factor, steps, train.lr_gamma)
    )


def unsup_weight_at(step: int, method: MethodConfig) -> float:
    """The unsupervised loss weight of iteration ``step`` (0-based): 0 during the burn-in
    (``method.unsup_start``), then a linear ramp over ``method.unsup_warmup`` iterations."""
    if step < method.unsup_start:
        return 0.0
    if method.unsup_warmup <= 0:
        return method.unsup_weight
    return method.unsup_weight * min(1.0, (step - method.unsup_start + 1) / method.unsup_warmup)


def build_loss_weights(method: MethodConfig, step: int | None = None) -> dict[str, float]:
    """Every loss's weight at iteration ``step`` (None: after burn-in and ramp)."""
    unsup = method.unsup_weight if step is None else unsup_weight_at(step, method)
    return loss_weights(unsup, method.polish_box_weight, method.polish_cls_weight)
