"""Builders that read the config: model, optimizer, learning-rate schedule."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from ssod.config import MethodConfig, ModelConfig, TrainConfig
from ssod.methods import build_method
from ssod.teaching import SemiSupervisedModel

def build_model(model_cfg: ModelConfig, method: MethodConfig, num_classes: int) -> SemiSupervisedModel:
    """Student of ``method``: Faster R-CNN, plus the polishing networks for Polishing Teacher."""
    return build_method(method).build_model(model_cfg, num_classes)


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
