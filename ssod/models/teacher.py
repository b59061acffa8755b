"""The EMA teacher and its pseudo labels.

The teacher is a copy of the student (detector + polishing networks) that is never
trained by gradient: after every optimizer step that really happened, its parameters move
towards the student's by an exponential moving average with a warm-up (docs/method.md 3, 4):
``m_t = min(m_max, 1 - (w + 1) / (t + w + 1))`` with w = 0 for the detector
(``min(0.999, 1 - 1/(t+1))``) and w = 100 for the polishing networks.

Pseudo labels of one image are a ``PseudoLabels``: the raw detections, and which of them
(with which labels and boxes) serve as classification and as regression targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssod.models.boxes import jitter_boxes, valid_boxes_mask
from ssod.models.rcnn import indices_where_all


def ema_momentum(step: int, max_momentum: float, warmup: int = 0) -> float:
    """Momentum at optimizer step ``step`` (0-based): ``min(max, 1 - (w+1)/(step+w+1))``."""
    return min(max_momentum, 1.0 - (warmup + 1) / (step + warmup + 1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, include_buffers: bool = False) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameters only by default.

    The reference averages parameters only; buffers (BatchNorm statistics) are copied
    from the student when ``include_buffers`` is set.
    """
    student_params = dict(student.named_parameters())
    targets = [param for _, param in teacher.named_parameters()]
    sources = [student_params[name].detach().to(param.dtype) for name, param in teacher.named_parameters()]
    # One fused update for all parameters (a few kernels on a GPU instead of one per tensor).
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)
    if include_buffers:
        student_buffers = dict(student.named_buffers())
        for name, buffer in teacher.named_buffers():
            buffer.copy_(student_buffers[name])


@dataclass
class PseudoLabels:
    """Pseudo labels of one unlabeled image, in the teacher's (weak) view.

    boxes [K, 4] xyxy, labels [K], scores [K]: raw detections above the initial score
    threshold. reg_boxes [K, 4]: regression targets (polished boxes, or the raw ones);
    reg_keep [K] bool: which of them are used. cls_keep [K] bool and cls_labels [K]:
    which raw boxes are classification targets, and with which (possibly polished) label.
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    reg_boxes: Tensor
    reg_keep: Tensor
    cls_keep: Tensor
    cls_labels: Tensor

    @classmethod
    def unpolished(cls, boxes: Tensor, labels: Tensor, scores: Tensor) -> "PseudoLabels":
        keep = torch.ones_like(scores, dtype=torch.bool)
        return cls(boxes, labels, scores, boxes, keep, keep.clone(), labels)

    def classification_keep(self, score_thr: float) -> Tensor:
        """[K] bool: the raw boxes that are classification targets at ``score_thr``."""
        return self.cls_keep & (self.scores > score_thr)

    def classification_target(self, score_thr: float) -> dict[str, Tensor]:
        keep = self.classification_keep(score_thr)
        return {"boxes": self.boxes[keep], "labels": self.cls_labels[keep]}

    def regression_target(self) -> dict[str, Tensor]:
        return {"boxes": self.reg_boxes[self.reg_keep], "labels": self.labels[self.reg_keep]}


@torch.no_grad()
def regression_uncertainty(
    detector: nn.Module,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    image_sizes: list[tuple[int, int]],
    times: int,
    scale: float,
) -> list[Tensor]:
    """Soft Teacher's box-jitter uncertainty: per image ``[K_i]`` normalised spread.

    Each box is jittered ``times`` times (std ``scale`` x size), the teacher's RoI head
    refines every copy with its class-specific regression, and the uncertainty is the mean
    standard deviation of the refined coordinates divided by the box's width/height.
    """
    counts = [b.shape[0] for b in boxes]
    if sum(counts) == 0:
        return [b.new_zeros((0,)) for b in boxes]
    jittered = [jitter_boxes(b, times, scale).reshape(times, -1, 4).transpose(0, 1).reshape(-1, 4) for b in boxes]
    heads = detector.roi_heads
    pooled = heads.box_head(heads.box_roi_pool(features, jittered, image_sizes))
    _, deltas = heads.box_predictor(pooled)
    refined = heads.box_coder.decode(deltas, jittered).reshape(-1, deltas.shape[1] // 4, 4)
    all_labels = torch.cat(labels).repeat_interleave(times)
    refined = refined[torch.arange(refined.shape[0], device=refined.device), all_labels]
    refined = refined.reshape(-1, times, 4)
    spread = refined.std(dim=1)
    base = torch.cat(boxes)
    size = (base[:, 2:] - base[:, :2]).clamp(min=1.0).repeat(1, 2)
    return list((spread / size).mean(dim=1).split(counts))


def filter_detections(detections: list[dict[str, Tensor]], score_thr: float) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Teacher detections -> (boxes, labels, scores) with valid boxes and score > thr."""
    # One wait for every image (an index per tensor and image would wait each).
    kept = indices_where_all([(det["scores"] > score_thr) & valid_boxes_mask(det["boxes"]) for det in detections])
    return [(det["boxes"][keep], det["labels"][keep], det["scores"][keep]) for det, keep in zip(detections, kept)]
