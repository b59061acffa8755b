"""The teacher-student machinery every semi-supervised method shares (``ssod.methods``).

``SemiSupervisedModel`` is the student: a Faster R-CNN and, for Polishing Teacher, the
two polishing networks. Its ``forward`` computes every student loss in one call (one
backbone pass over labeled and strong views together), so data-parallel training sees
one forward per backward. The teacher is an EMA copy of the same module. Here too: carrying
pseudo labels from the teacher's weak view into the student's strong view, the teacher's
background weights, and the oracle's pseudo labels.

Batches: labeled items are ``(image [3,H,W], target, matrix)``; unlabeled items are
``(weak View, strong View, hidden target)``. All boxes are xyxy absolute pixels of the
view they belong to; ``relative_matrix(weak, strong)`` carries teacher boxes into the
student's view.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.models.detection.image_list import ImageList

from ssod.data.transforms import map_boxes, project_target
from ssod.losses import box_outputs, detector_losses
from ssod.models.rcnn import indices_where_all
from ssod.models.polish import Polisher
from ssod.models.teacher import PseudoLabels


class SemiSupervisedModel(nn.Module):
    """Detector plus optional polishing networks; ``forward`` returns the loss dict."""

    def __init__(self, detector: nn.Module, polisher: Optional[Polisher] = None) -> None:
        super().__init__()
        self.detector = detector
        self.polisher = polisher

    def forward(
        self,
        labeled_images: list[Tensor],
        labeled_targets: list[dict],
        strong_images: list[Tensor] = (),
        pseudo_targets: Optional[dict[str, list[dict]]] = None,
        background_weights=None,
        polish_inputs: Optional[dict] = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Returns (losses, detached statistics); see ``ssod.losses`` for the keys."""
        detector = self.detector
        with record_function("ssod::student_backbone"):
            images, _ = detector.transform(list(labeled_images) + list(strong_images))
            features = detector.backbone(images.tensors)
        with record_function("ssod::detector_losses"):
            # One RPN and one RoI pass over labeled images and strong views together.
            pseudo = pseudo_targets if strong_images else None
            losses = detector_losses(detector, images, features, list(labeled_targets), pseudo, background_weights)
        stats: dict[str, Tensor] = {}
        if self.polisher is not None and polish_inputs is not None:
            with record_function("ssod::polisher_losses"):
                polish_losses, stats = self.polisher.losses(**polish_inputs)
            losses.update(polish_losses)
        return losses, stats


def split_batch(images: ImageList, features: dict[str, Tensor], count: int):
    """Split a batched ImageList and its features into the first ``count`` images and the rest."""
    sizes = images.image_sizes
    head = (ImageList(images.tensors[:count], sizes[:count]), {k: v[:count] for k, v in features.items()})
    tail = (ImageList(images.tensors[count:], sizes[count:]), {k: v[count:] for k, v in features.items()})
    return head, tail


@dataclass
class TeacherOutput:
    """What the teacher saw on one batch (weak view of unlabeled images)."""

    pseudo_labels: list[PseudoLabels]
    weak_features: dict[str, Tensor]
    weak_sizes: list[tuple[int, int]]
    polish_inputs: Optional[dict] = None
    stats: dict[str, Tensor] = field(default_factory=dict)


@contextmanager
def score_threshold(heads, threshold: float):
    """Let the RoI heads drop detections scoring at most ``threshold`` before their NMS.

    The detections above it are those of the full post-processing (a box is only ever
    suppressed by a higher-scoring one, and the per-image cap keeps the best first), up to
    float rounding: torchvision's batched NMS shifts boxes by the largest coordinate among
    the candidates, so a pair within ~1e-5 of the IoU threshold could decide otherwise. The
    NMS and the host work behind it shrink from every candidate above the detector's own
    threshold (0.05) to the few above the pseudo-label threshold.
    """
    saved = heads.score_thresh
    heads.score_thresh = max(saved, threshold)
    try:
        yield
    finally:
        heads.score_thresh = saved


def project_pseudo_labels(pseudo: list[PseudoLabels], weak_to_strong: Tensor, strong_sizes, rpn_threshold: float,
                          cls_threshold: float):
    """Classification (for RPN and RoI) and regression targets in the student's view.

    ``weak_to_strong``: ``[B, 3, 3]``, per image the weak view -> strong view matrix.
    Returns ``{"rpn", "cls", "reg"}`` -> per-image ``{"boxes", "labels"}``; boxes leaving
    the strong view, or made degenerate, are dropped.
    """
    mapped, masks = [], []
    for labels, matrix, (height, width) in zip(pseudo, weak_to_strong, strong_sizes):
        boxes, valid = map_boxes(labels.boxes, matrix, width, height)
        reg_boxes, reg_valid = map_boxes(labels.reg_boxes, matrix, width, height)
        mapped.append((boxes, reg_boxes))
        masks += [
            labels.classification_keep(rpn_threshold) & valid,
            labels.classification_keep(cls_threshold) & valid,
            labels.reg_keep & reg_valid,
        ]
    kept = iter(indices_where_all(masks))  # one wait for every image's three targets
    targets: dict[str, list[dict]] = {"rpn": [], "cls": [], "reg": []}
    for labels, (boxes, reg_boxes) in zip(pseudo, mapped):
        targets["rpn"].append(_target(boxes, labels.cls_labels, next(kept)))
        targets["cls"].append(_target(boxes, labels.cls_labels, next(kept)))
        targets["reg"].append(_target(reg_boxes, labels.labels, next(kept)))
    return targets


def _target(boxes: Tensor, labels: Tensor, index: Tensor) -> dict[str, Tensor]:
    """The float32 target of rows ``index`` of ``boxes`` and ``labels``."""
    return {"boxes": boxes[index].float(), "labels": labels[index]}


def make_background_weights(teacher: SemiSupervisedModel, out: TeacherOutput, strong_to_weak: Tensor):
    """Closure: student proposals (strong view) -> teacher background probability per proposal.

    ``strong_to_weak``: ``[B, 3, 3]``, per image the strong view -> weak view matrix. Every
    proposal is pooled (clipped to the weak view), none dropped, so weights stay aligned.
    """

    @torch.no_grad()
    @record_function("ssod::background_weights")
    def background_weights(proposals: list[Tensor]) -> list[Tensor]:
        mapped = [
            map_boxes(boxes.detach(), matrix, width, height, min_size=0.0)[0].to(boxes.dtype)
            for boxes, matrix, (height, width) in zip(proposals, strong_to_weak, out.weak_sizes)
        ]
        logits, _ = box_outputs(teacher.detector, out.weak_features, mapped, out.weak_sizes)
        return list(logits.float().softmax(dim=1)[:, 0].split([m.shape[0] for m in mapped]))

    return background_weights


@dataclass
class StepResult:
    """Unweighted losses (attached), detached statistics, and the teacher's output (if any)."""

    losses: dict[str, Tensor]
    stats: dict[str, Tensor]
    teacher: Optional[TeacherOutput] = None


def oracle_pseudo_labels(unlabeled: list) -> list[PseudoLabels]:
    """The hidden ground truth of each unlabeled image in its weak view, as pseudo labels of
    score 1 (``method.pseudo_labels=oracle``: a diagnostic, never a result)."""
    oracle = []
    for weak, _, hidden in unlabeled:
        height, width = weak.image.shape[-2:]
        target = project_target(hidden, weak.matrix, width, height)
        boxes, labels = target["boxes"].float(), target["labels"]
        oracle.append(PseudoLabels.unpolished(boxes, labels, torch.ones(len(labels), device=boxes.device)))
    return oracle
