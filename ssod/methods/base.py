"""What a training method is, and the semi-supervised flow every teacher-student method shares.

A method owns: the model it trains (a detector, plus polishing networks for Polishing
Teacher), the weight of every loss at every step, how its teacher makes pseudo labels, how
the teacher follows the student (EMA), and one step's losses. ``ssod.methods.METHODS`` maps
``method.name`` to its class; a method reads only its own settings, built here from the
flat ``method`` config group (whose keys stay flat: users' overrides and tuning spaces name
them).

One step of a teacher-student method (``compute_losses``):

1. the teacher sees the weak views (and, with polishing networks, the labeled images) and
   makes pseudo labels (``pseudo_labels``, the part each method defines);
2. the pseudo labels are carried into the strong views (``project_pseudo_labels``), the
   hidden ground truth instead with ``method.pseudo_labels=oracle``;
3. the student computes every loss in one forward pass over labeled images and strong views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ssod.config import MethodConfig, ModelConfig
from ssod.data.transforms import relative_matrix
from ssod.teaching import (
    SemiSupervisedModel,
    StepResult,
    TeacherOutput,
    make_background_weights,
    oracle_pseudo_labels,
    project_pseudo_labels,
    score_threshold,
    split_batch,
)
from ssod.losses import loss_weights
from ssod.models.detector import build_detector
from ssod.models.teacher import PseudoLabels, ema_momentum, ema_update, filter_detections


@dataclass(frozen=True)
class LossSchedule:
    """The unsupervised weight, its burn-in and ramp, and the polishing networks' weights."""

    unsup_weight: float
    unsup_start: int
    unsup_warmup: int
    polish_box_weight: float
    polish_cls_weight: float

    @classmethod
    def of(cls, cfg: MethodConfig) -> "LossSchedule":
        return cls(cfg.unsup_weight, cfg.unsup_start, cfg.unsup_warmup, cfg.polish_box_weight, cfg.polish_cls_weight)

    def unsup_weight_at(self, step: int) -> float:
        """The unsupervised weight of iteration ``step`` (0-based): 0 during the burn-in
        (``method.unsup_start``), then a linear ramp over ``method.unsup_warmup`` iterations."""
        if step < self.unsup_start:
            return 0.0
        if self.unsup_warmup <= 0:
            return self.unsup_weight
        return self.unsup_weight * min(1.0, (step - self.unsup_start + 1) / self.unsup_warmup)

    def weights(self, step: Optional[int] = None) -> dict[str, float]:
        """Every loss's weight at iteration ``step`` (None: after burn-in and ramp)."""
        unsup = self.unsup_weight if step is None else self.unsup_weight_at(step)
        return loss_weights(unsup, self.polish_box_weight, self.polish_cls_weight)


@dataclass(frozen=True)
class PseudoLabelThresholds:
    """Teacher detections above ``initial`` are pseudo labels; the RPN and the RoI
    classification learn from those above ``rpn`` and ``cls``."""

    initial: float
    rpn: float
    cls: float

    @classmethod
    def of(cls, cfg: MethodConfig) -> "PseudoLabelThresholds":
        return cls(cfg.pseudo_label_initial_score_thr, cfg.rpn_pseudo_threshold, cfg.cls_pseudo_threshold)


@dataclass(frozen=True)
class EmaSettings:
    """How the teacher follows the student: the detector's EMA and the polishing networks'."""

    momentum: float
    include_buffers: bool
    freeze_after_first_lr_step: bool
    polish_momentum: float
    polish_warmup: int

    @classmethod
    def of(cls, cfg: MethodConfig) -> "EmaSettings":
        return cls(cfg.ema_momentum, cfg.ema_include_buffers, cfg.ema_freeze_after_first_lr_step,
                   cfg.polish_ema_momentum, cfg.polish_ema_warmup)


class Method:
    """A teacher-student method; subclasses define ``pseudo_labels`` (and may add a polisher)."""

    name = ""
    title = ""  # for people: the run's description
    needs_unlabeled = True

    def __init__(self, cfg: MethodConfig) -> None:
        self.schedule = LossSchedule.of(cfg)
        self.thresholds = PseudoLabelThresholds.of(cfg)
        self.ema = EmaSettings.of(cfg)
        self.oracle = cfg.pseudo_labels == "oracle"
        self.background_weighting = cfg.background_weighting

    # --- the model ------------------------------------------------------------------------

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> SemiSupervisedModel:
        detector = build_detector(model_cfg, num_classes)
        return SemiSupervisedModel(detector, self.build_polisher(detector, num_classes))

    def build_polisher(self, detector: nn.Module, num_classes: int) -> Optional[nn.Module]:
        return None

    def loss_weights(self, step: Optional[int] = None) -> dict[str, float]:
        return self.schedule.weights(step)

    def semi_supervised_at(self, step: int) -> bool:
        """Whether iteration ``step`` draws an unlabeled batch (not during the burn-in)."""
        return self.needs_unlabeled and step >= self.schedule.unsup_start

    # --- one step ---------------------------------------------------------------------------

    def compute_losses(self, student: nn.Module, teacher: SemiSupervisedModel, labeled: list, unlabeled: list) -> StepResult:
        """Teacher pseudo labels, then every student loss, for one batch already on the device."""
        images = [item[0] for item in labeled]
        targets = [{"boxes": item[1]["boxes"], "labels": item[1]["labels"]} for item in labeled]
        if not unlabeled:
            # A supervised step still trains polishing networks when the model has them
            # (the burn-in of Polishing Teacher); they learn from teacher features as always.
            polish_inputs = self.teach(teacher, images, targets, []).polish_inputs if teacher.polisher is not None else None
            losses, stats = student(images, targets, polish_inputs=polish_inputs)
            return StepResult(losses, stats)
        weak = [item[0] for item in unlabeled]
        strong = [item[1] for item in unlabeled]
        out = self.teach(teacher, images, targets, [view.image for view in weak])
        if self.oracle:
            out.pseudo_labels = oracle_pseudo_labels(unlabeled)
        weak_matrices = torch.stack([view.matrix for view in weak])
        strong_matrices = torch.stack([view.matrix for view in strong])
        strong_sizes = [tuple(view.image.shape[-2:]) for view in strong]
        with record_function("ssod::project_pseudo_labels"):
            weak_to_strong = relative_matrix(weak_matrices, strong_matrices)
            pseudo_targets = project_pseudo_labels(out.pseudo_labels, weak_to_strong, strong_sizes,
                                                   self.thresholds.rpn, self.thresholds.cls)
        background = None
        if self.background_weighting:
            background = make_background_weights(teacher, out, relative_matrix(strong_matrices, weak_matrices))
        losses, stats = student(images, targets, [view.image for view in strong], pseudo_targets, background, out.polish_inputs)
        return StepResult(losses, stats, out)

    @torch.no_grad()
    def teach(self, teacher: SemiSupervisedModel, labeled_images: list[Tensor], labeled_targets: list[dict],
              weak_images: list[Tensor]) -> TeacherOutput:
        """Teacher pseudo labels on the weak views (and polishing-network inputs on labeled images)."""
        detector = teacher.detector
        train_polisher = teacher.polisher is not None
        batch = (list(labeled_images) if train_polisher else []) + list(weak_images)
        with record_function("ssod::teacher_backbone_rpn"):
            images, _ = detector.transform(batch)
            features = detector.backbone(images.tensors)
            proposals, _ = detector.rpn(images, features)
        # The RoI pooler infers its pyramid scales once, on its first call, from the image
        # sizes it is given (torchvision's way). Below it pools a part of this batch whose
        # features are padded to the whole batch: were that its first call (a resumed
        # process's first step), it could infer them wrong (twice the true ones when those
        # images are smaller than the batch's largest) and pool at them from then on.
        detector.roi_heads.box_roi_pool.pyramid(features, images.image_sizes)
        count = len(labeled_images) if train_polisher else 0
        (lab_images, lab_features), (weak_list, weak_features) = split_batch(images, features, count)
        sizes = weak_list.image_sizes
        pseudo = []
        if weak_images:
            with record_function("ssod::pseudo_labels"):
                with score_threshold(detector.roi_heads, self.thresholds.initial):
                    detections, _ = detector.roi_heads(weak_features, proposals[count:], sizes)
                raw = filter_detections(detections, self.thresholds.initial)
                pseudo = self.pseudo_labels(teacher, weak_features, raw, sizes)
        polish_inputs = None
        if train_polisher:
            polish_inputs = {
                "features": lab_features,
                "gt_boxes": [t["boxes"] for t in labeled_targets],
                "gt_labels": [t["labels"] for t in labeled_targets],
                "proposals": proposals[:count],
                "image_sizes": lab_images.image_sizes,
            }
        return TeacherOutput(pseudo, weak_features, sizes, polish_inputs)

    def pseudo_labels(self, teacher: SemiSupervisedModel, features: dict[str, Tensor],
                      raw: list[tuple[Tensor, Tensor, Tensor]], sizes: list[tuple[int, int]]) -> list[PseudoLabels]:
        """The method's pseudo labels of the weak views from the teacher's detections there:
        ``raw`` is (boxes, labels, scores) per image, scores above ``thresholds.initial``."""
        raise NotImplementedError(f"{type(self).__name__} makes no pseudo labels")

    # --- the teacher ------------------------------------------------------------------------

    def update_teacher(self, teacher: SemiSupervisedModel, student: SemiSupervisedModel, step: int, ema_steps: int,
                       lr_steps) -> None:
        """EMA step for the detector and the polishing networks after a real optimizer step
        (``step``: 0-based iteration; ``ema_steps``: EMA steps taken before this one).

        ``method.ema_freeze_after_first_lr_step`` stops the detector's teacher only: in the
        reference, the polishing networks' teacher (its MeanRFNet hook) follows its student
        to the end.
        """
        frozen = self.ema.freeze_after_first_lr_step and lr_steps and step + 1 > min(lr_steps)
        if not frozen:
            ema_update(teacher.detector, student.detector, ema_momentum(ema_steps, self.ema.momentum),
                       self.ema.include_buffers)
        if student.polisher is not None:
            momentum = ema_momentum(ema_steps, self.ema.polish_momentum, self.ema.polish_warmup)
            ema_update(teacher.polisher, student.polisher, momentum, self.ema.include_buffers)
