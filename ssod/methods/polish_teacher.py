"""Polishing Teacher (docs/method.md): dual polishing networks and disentangled pseudo labels.

The box-polishing network moves every teacher box (the regression pseudo labels); the
category-polishing network keeps or relabels each one (the classification pseudo labels).
Both train on the labeled images from teacher features, from the first step on (the burn-in
included), and polish through their own EMA copies. ``method.polish_use`` uses one, both or
neither of them (the ablations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from ssod.config import MethodConfig
from ssod.methods.base import Method
from ssod.models.boxes import valid_boxes_mask
from ssod.models.polish import Polisher
from ssod.models.teacher import PseudoLabels


@dataclass(frozen=True)
class PolishSettings:
    """The polishing networks and the keep/relabel rule (docs/method.md 4)."""

    hidden: int
    vote_frac: float
    box_samples: int
    box_scale: float
    category_samples: tuple[int, int]
    category_scales: tuple[float, float]
    pos_iou: float
    rf_cls_thr: float
    det_score_thr: float
    use: str  # both | boxes | categories | none

    @classmethod
    def of(cls, cfg: MethodConfig) -> "PolishSettings":
        return cls(cfg.polish_hidden, cfg.rf_vote_frac, cfg.reg_samples, cfg.reg_scale, tuple(cfg.cls_samples),
                   tuple(cfg.cls_scales), cfg.cls_pos_iou, cfg.rf_cls_thr, cfg.det_score_thr, cfg.polish_use)


class PolishTeacher(Method):
    name = "polish_teacher"
    title = "Polishing Teacher"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.polish = PolishSettings.of(cfg)

    def build_polisher(self, detector: nn.Module, num_classes: int) -> Polisher:
        p = self.polish
        return Polisher(
            roi_pool=detector.roi_heads.box_roi_pool, in_channels=detector.backbone.out_channels,
            num_classes=num_classes, hidden=p.hidden, vote_frac=p.vote_frac, box_samples=p.box_samples,
            box_scale=p.box_scale, category_samples=p.category_samples, category_scales=p.category_scales,
            pos_iou=p.pos_iou, rf_cls_thr=p.rf_cls_thr, det_score_thr=p.det_score_thr,
        )

    def pseudo_labels(self, teacher, features: dict[str, Tensor], raw, sizes) -> list[PseudoLabels]:
        polished = teacher.polisher.polish(features, *map(list, zip(*raw)), sizes)
        return [self.use_polished(p) for p in polished]

    def use_polished(self, polished: PseudoLabels) -> PseudoLabels:
        """One image's pseudo labels as ``method.polish_use`` says: without box polishing the
        regression targets are the raw boxes; without category polishing classification keeps
        the detections scoring above ``det_score_thr``, with their own labels."""
        p = polished
        if self.polish.use not in ("both", "boxes"):
            p = replace(p, reg_boxes=p.boxes, reg_keep=valid_boxes_mask(p.boxes))
        if self.polish.use not in ("both", "categories"):
            p = replace(p, cls_keep=p.scores > self.polish.det_score_thr, cls_labels=p.labels)
        return p
