"""Detector losses as functions, on features the caller has already computed.

Every function returns a flat, namespaced dict of unweighted losses (``sup/...``,
``unsup/...``); ``weighted_total`` is the one place that weights them. Targets follow
torchvision's contract: ``boxes`` [N, 4] float xyxy in the image's own (view) pixels,
``labels`` [N] int64 in 1..C. A target with no boxes gives a zero box-regression loss.

The unsupervised losses are disentangled (docs/method.md 5): RPN and RoI classification learn
from the classification pseudo labels, RoI regression from the (polished) regression
pseudo labels, each with its own proposal sampling.

``detector_losses`` computes both kinds for a batch of labeled images and strong views in
one RPN pass and one RoI pass (the training step's path); ``supervised_losses`` and
``unsupervised_losses`` are its one-group cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ssod.models.rcnn import indices_where_all

BackgroundWeights = Callable[[list[Tensor]], list[Tensor]]


def box_outputs(detector, features: dict[str, Tensor], proposals: list[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
    heads = detector.roi_heads
    pooled = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
    return heads.box_predictor(pooled)


class _RPNPass:
    """The RPN's head, anchors and proposals for a whole batch, computed once.

    ``loss(first, targets)`` is torchvision's RPN loss on images ``first .. first + len(targets)``
    alone, as if the RPN had run on those images only: the head, the anchors and each image's
    proposals work image by image, so one pass serves several groups of images with their own
    targets and their own loss normalisation. Each ``loss`` call samples anchors from the global
    RNG, as ``rpn.forward`` does; calling them in the old order keeps the old random draws.
    (On a GPU the larger batch may run other kernels, so values agree up to float rounding,
    and a near-tie of RPN scores can then pick another proposal.)
    """

    def __init__(self, rpn, images: ImageList, features: dict[str, Tensor]) -> None:
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        self.rpn = rpn
        self.anchors = rpn.anchor_generator(images, maps)
        per_level = [o[0].numel() for o in objectness]
        self.objectness, self.deltas = concat_box_prediction_layers(objectness, deltas)
        self.per_image = sum(per_level)
        decoded = rpn.box_coder.decode(self.deltas.detach(), self.anchors).view(len(self.anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(decoded, self.objectness, images.image_sizes, per_level)
        # Gradients never flow into the proposals (torchvision's convention).
        self.proposals = [b.detach() for b in boxes]

    def loss(self, first: int, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """(objectness loss, box loss) of images ``first ..`` against ``targets``."""
        rows = slice(first * self.per_image, (first + len(targets)) * self.per_image)
        anchors = self.anchors[first : first + len(targets)]
        labels, matched = self.rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.rpn.box_coder.encode(matched, anchors)
        return self.rpn.compute_loss(self.objectness[rows], self.deltas[rows], labels, regression_targets)


def detector_losses(
    detector,
    images: ImageList,
    features: dict[str, Tensor],
    targets: list[dict],
    pseudo_targets: Optional[Mapping[str, list[dict]]] = None,
    background_weights: Optional[BackgroundWeights] = None,
) -> dict[str, Tensor]:
    """Supervised losses on the first ``len(targets)`` images, unsupervised ones on the rest.

    ``images``/``features``: the batch, labeled images first, then the strong views (which
    need ``pseudo_targets``, see ``unsupervised_losses``). One RPN pass and one RoI pass serve
    the whole batch; every loss equals that of separate passes over the two groups up to float
    rounding (RPN, RoI pooling and the box head work image by image, box by box), and the
    samplers draw from the RNG in the same order as separate passes would.
    """
    heads = detector.roi_heads
    count = len(targets)
    rpn = _RPNPass(detector.rpn, images, features)
    losses: dict[str, Tensor] = {}
    # The boxes of the single RoI pass, per image in batch order, as pieces: each labeled
    # image's samples; each strong view's classification samples, then its positive
    # regression samples (the regression loss reads positives only).
    pieces: list[list[Tensor]] = []
    if count:
        losses["sup/rpn_cls"], losses["sup/rpn_reg"] = rpn.loss(0, targets)
        sup_proposals, _, sup_labels, sup_deltas = heads.select_training_samples(rpn.proposals[:count], targets)
        pieces += [[p] for p in sup_proposals]
    if pseudo_targets is not None:
        unsup = _sample_unsupervised(heads, rpn, count, pseudo_targets)
        losses["unsup/rpn_cls"], losses["unsup/rpn_reg"] = unsup.rpn_loss
        pieces += [[c, r] for c, r in zip(unsup.cls_proposals, unsup.reg_proposals)]
    if len(pieces) != len(images.image_sizes):
        raise ValueError(f"{len(images.image_sizes)} images but targets for {len(pieces)}: strong views need pseudo_targets")
    rois = [torch.cat(piece) for piece in pieces]
    class_logits, box_regression = box_outputs(detector, features, rois, images.image_sizes)
    sizes = [len(boxes) for piece in pieces for boxes in piece]
    logits, regression = class_logits.split(sizes), box_regression.split(sizes)
    if count:
        losses["sup/roi_cls"], losses["sup/roi_reg"] = fastrcnn_loss(
            torch.cat(logits[:count]), torch.cat(regression[:count]), sup_labels, sup_deltas
        )
    if pseudo_targets is not None:
        labels = torch.cat(unsup.cls_labels)
        weights = torch.ones_like(labels, dtype=class_logits.dtype)
        if background_weights is not None:
            teacher_bg = torch.cat(background_weights(unsup.cls_proposals)).to(weights.dtype)
            weights = torch.where(labels == 0, teacher_bg, weights)
        per_sample = F.cross_entropy(torch.cat(logits[count::2]).float(), labels, reduction="none")
        losses["unsup/roi_cls"] = (per_sample * weights).sum() / weights.sum().clamp(min=1.0)
        reg_labels = torch.cat(unsup.reg_labels)
        losses["unsup/roi_reg"] = box_regression_loss(
            torch.cat(regression[count + 1 :: 2]).float(), reg_labels, torch.cat(unsup.reg_deltas), unsup.roi_regression_samples
        )
    return losses


@dataclass
class _UnsupervisedSamples:
    """The strong views' RPN loss and RoI samples, per image (see ``_sample_unsupervised``)."""

    rpn_loss: tuple[Tensor, Tensor]
    cls_proposals: list[Tensor]
    cls_labels: list[Tensor]
    reg_proposals: list[Tensor]  # positives only
    reg_labels: list[Tensor]
    reg_deltas: list[Tensor]
    roi_regression_samples: int  # the size of the whole RoI regression sampling: its loss's normaliser


def _sample_unsupervised(heads, rpn: _RPNPass, first: int, pseudo_targets: Mapping[str, list[dict]]) -> _UnsupervisedSamples:
    """RPN loss and the two RoI samplings (classification, regression) of the strong views.

    Both samplings start from the same proposals. Of the regression sampling only the
    positives are kept: its loss reads no other sample.
    """
    proposals = rpn.proposals[first:]
    rpn_loss = rpn.loss(first, pseudo_targets["rpn"])
    cls_proposals, _, cls_labels, _ = heads.select_training_samples(proposals, pseudo_targets["cls"])
    reg_proposals, _, reg_labels, reg_deltas = heads.select_training_samples(proposals, pseudo_targets["reg"])
    positive = indices_where_all([labels > 0 for labels in reg_labels])  # one wait, not one per image
    return _UnsupervisedSamples(
        rpn_loss,
        cls_proposals,
        cls_labels,
        [p[i] for p, i in zip(reg_proposals, positive)],
        [p[i] for p, i in zip(reg_labels, positive)],
        [p[i] for p, i in zip(reg_deltas, positive)],
        sum(len(labels) for labels in reg_labels),
    )


def supervised_losses(detector, images: ImageList, features: dict[str, Tensor], targets: list[dict]) -> dict[str, Tensor]:
    """Standard Faster R-CNN losses on labeled images (detector in train mode)."""
    return detector_losses(detector, images, features, targets)


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
    return detector_losses(detector, images, features, [], pseudo_targets, background_weights)


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
