"""Soft Teacher (Xu et al., ICCV 2021): the baseline without polishing networks.

Classification pseudo labels are the teacher's detections above ``method.cls_pseudo_threshold``
(0.9), negatives weighted by the teacher's background probability; regression pseudo labels
are the detections whose box-jitter spread is below ``method.reg_uncertainty_thr`` (all of
them when it is null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ssod.config import MethodConfig
from ssod.methods.base import Method
from ssod.models.teacher import PseudoLabels, regression_uncertainty


@dataclass(frozen=True)
class BoxJitter:
    """Regression uncertainty: boxes jittered ``times`` times by ``scale`` x (w, h)."""

    threshold: Optional[float]
    times: int
    scale: float


class SoftTeacher(Method):
    name = "soft_teacher"
    title = "Soft Teacher"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.jitter = BoxJitter(cfg.reg_uncertainty_thr, cfg.reg_jitter_times, cfg.reg_jitter_scale)

    def pseudo_labels(self, teacher, features: dict[str, Tensor], raw, sizes) -> list[PseudoLabels]:
        if self.jitter.threshold is None:
            return [PseudoLabels.unpolished(*r) for r in raw]
        boxes, labels, _ = map(list, zip(*raw))
        spread = regression_uncertainty(teacher.detector, features, boxes, labels, sizes, self.jitter.times,
                                        self.jitter.scale)
        pseudo = []
        for (b, l, s), u in zip(raw, spread):
            keep = torch.ones_like(s, dtype=torch.bool)
            pseudo.append(PseudoLabels(b, l, s, b, u < self.jitter.threshold, keep, l))
        return pseudo
