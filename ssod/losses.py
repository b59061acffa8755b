"""Detector losses as functions, on features the caller has already computed.

Every function returns a flat, namespaced dict of unweighted losses (``sup/...``,
``unsup/...``); ``weighted_total`` is the one place that weights them. Targets follow
torchvision's contract: ``boxes`` [N, 4] float xyxy in the image's own (view) pixels,
``labels`` [N] int64 in 1..C. A target with no boxes gives a zero box-regression loss.

The unsupervised losses are disentangled (METHOD 5): RPN and RoI classification learn
from the classification pseudo labels, RoI regression from the (polished) regression
pseudo labels, each with its own proposal sampling.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

BackgroundWeights = Callable[[list[Tensor]], list[Tensor]]


def _box_outputs(detector, features: dict[str, Tensor], proposals: list[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
    heads = detector.roi_heads
    pooled = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
    return heads.box_predictor(pooled)


def supervised_losses(detector, images: ImageList, features: dict[str, Tensor], targets: list[dict]) -> dict[str, Tensor]:
    """Standard Faster R-CNN losses on labeled images (detector in train mode)."""
    proposals, rpn = detector.rpn(images, features, targets)
    heads = detector.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    class_logits, box_regression = _box_outputs(detector, features, proposals, images.image_sizes)
    roi_cls, roi_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    return {
        "sup/rpn_cls": rpn["loss_objectness"],
        "sup/rpn_reg": rpn["loss_rpn_box_reg"],
        "sup/roi_cls": roi_cls,
        "sup/roi_reg": roi_reg,
    }


def box_regression_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor, num_samples: int) -> Tensor:
    """Smooth-L1 on the positive samples' class-specific deltas, as torchvision's head."""
    positive = torch.where(labels > 0)[0]
    # Explicit class count: with no sample at all, -1 would be ambiguous for reshape.
    deltas = box_regression.reshape(box_regression.shape[0], box_regression.shape[1] // 4, 4)[positive, labels[positive]]
    loss = F.smooth_l1_loss(deltas, regression_targets[positive], beta=1 / 9, reduction="sum")
    return loss / max(num_samples, 1)


def unsupervised_losses(
    detector,
    images: ImageList,
    features: dict[str, Tensor],
    pseudo_targets: Mapping[str, list[dict]],
    background_weights: Optional[BackgroundWeights] = None,
) -> dict[str, Tensor]:
    """Student losses on strong views against teacher pseudo labels (already projected).

    ``pseudo_targets``: ``{"rpn", "cls", "reg"}`` -> per-image targets for the RPN, the
    RoI classification and the RoI regression.

    ``background_weights(proposals) -> per-image [P_i]`` gives each sampled proposal's
    teacher background probability (Soft Teacher); negatives are weighted by it, positives
    by 1, and the classification loss is normalised by the sum of weights.
    """
    heads = detector.roi_heads
    cls_targets, reg_targets = pseudo_targets["cls"], pseudo_targets["reg"]
    proposals, rpn = detector.rpn(images, features, pseudo_targets["rpn"])
    # Both samplings start from the same proposals; gradients never flow into them.
    proposals = [p.detach() for p in proposals]

    cls_proposals, _, cls_labels, _ = heads.select_training_samples(proposals, cls_targets)
    reg_proposals, _, reg_labels, reg_deltas = heads.select_training_samples(proposals, reg_targets)
    # One RoI pass for both samplings: RoIAlign and the box head work box by box, so the
    # outputs equal two separate passes, at the cost of one feature-gradient buffer.
    both = [torch.cat([c, r]) for c, r in zip(cls_proposals, reg_proposals)]
    is_cls = torch.cat([
        torch.arange(len(c) + len(r), device=c.device) < len(c) for c, r in zip(cls_proposals, reg_proposals)
    ])
    class_logits, box_regression = _box_outputs(detector, features, both, images.image_sizes)
    class_logits, box_regression = class_logits[is_cls], box_regression[~is_cls]

    labels = torch.cat(cls_labels)
    weights = torch.ones_like(labels, dtype=class_logits.dtype)
    if background_weights is not None:
        teacher_bg = torch.cat(background_weights(cls_proposals)).to(weights.dtype)
        weights = torch.where(labels == 0, teacher_bg, weights)
    per_sample = F.cross_entropy(class_logits.float(), labels, reduction="none")
    roi_cls = (per_sample * weights).sum() / weights.sum().clamp(min=1.0)

    reg_labels_flat = torch.cat(reg_labels)
    roi_reg = box_regression_loss(box_regression.float(), reg_labels_flat, torch.cat(reg_deltas), reg_labels_flat.numel())
    return {
        "unsup/rpn_cls": rpn["loss_objectness"],
        "unsup/rpn_reg": rpn["loss_rpn_box_reg"],
        "unsup/roi_cls": roi_cls,
        "unsup/roi_reg": roi_reg,
    }


def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum(weights[k] * losses[k])``; every loss must have a weight (no silent extras)."""
    missing = set(losses) - set(weights)
    if missing:
        raise KeyError(f"losses without a weight: {sorted(missing)}")
    return sum(weights[name] * value for name, value in losses.items())


def loss_weights(unsup_weight: float, polish_box_weight: float = 1.0, polish_cls_weight: float = 1.0) -> dict[str, float]:
    """The weight of every loss name, in one place."""
    weights = {f"sup/{k}": 1.0 for k in ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")}
    weights.update({f"unsup/{k}": unsup_weight for k in ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")})
    weights.update({"polish/box": polish_box_weight, "polish/cls": polish_cls_weight})
    return weights
