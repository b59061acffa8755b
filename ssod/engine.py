"""One training step and evaluation.

``SemiSupervisedModel`` is the student: a Faster R-CNN and, for Polishing Teacher, the
two polishing networks. Its ``forward`` computes every student loss in one call (one
backbone pass over labeled and strong views together), so data-parallel training sees
one forward per backward. The teacher is an EMA copy of the same module.

Batches: labeled items are ``(image [3,H,W], target, matrix)``; unlabeled items are
``(weak View, strong View, hidden target)``. All boxes are xyxy absolute pixels of the
view they belong to; ``relative_matrix(weak, strong)`` carries teacher boxes into the
student's view.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.models.detection.image_list import ImageList

from ssod.config import MethodConfig
from ssod.data.transforms import map_boxes, project_boxes, project_target, relative_matrix
from ssod.losses import _box_outputs, detector_losses
from ssod.models.boxes import valid_boxes_mask
from ssod.models.host_waits import indices_where_all
from ssod.models.polish import Polisher
from ssod.models.teacher import PseudoLabels, filter_detections, regression_uncertainty

log = logging.getLogger(__name__)


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


def _split(images: ImageList, features: dict[str, Tensor], count: int):
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


@torch.no_grad()
def teacher_forward(
    teacher: SemiSupervisedModel,
    labeled_images: list[Tensor],
    labeled_targets: list[dict],
    weak_images: list[Tensor],
    method: MethodConfig,
) -> TeacherOutput:
    """Teacher pseudo labels on the weak views (and polishing-network inputs on labeled images)."""
    detector = teacher.detector
    train_polisher = teacher.polisher is not None
    batch = (list(labeled_images) if train_polisher else []) + list(weak_images)
    with record_function("ssod::teacher_backbone_rpn"):
        images, _ = detector.transform(batch)
        features = detector.backbone(images.tensors)
        proposals, _ = detector.rpn(images, features)
    count = len(labeled_images) if train_polisher else 0
    (lab_images, lab_features), (weak_list, weak_features) = _split(images, features, count)
    sizes = weak_list.image_sizes
    with record_function("ssod::pseudo_labels"):
        pseudo = _pseudo_labels(teacher, weak_features, proposals[count:], sizes, method) if weak_images else []
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


def _pseudo_labels(teacher: SemiSupervisedModel, features, proposals, sizes, method: MethodConfig) -> list[PseudoLabels]:
    """Teacher detections above the initial threshold, polished or filtered by the method."""
    detector = teacher.detector
    with _score_threshold(detector.roi_heads, method.pseudo_label_initial_score_thr):
        detections, _ = detector.roi_heads(features, proposals, sizes)
    raw = filter_detections(detections, method.pseudo_label_initial_score_thr)
    if teacher.polisher is not None:
        polished = teacher.polisher.polish(features, *map(list, zip(*raw)), sizes)
        return [_use_polished(p, method) for p in polished]
    if method.reg_uncertainty_thr is not None:
        boxes, labels, _ = map(list, zip(*raw))
        spread = regression_uncertainty(detector, features, boxes, labels, sizes, method.reg_jitter_times, method.reg_jitter_scale)
        pseudo = []
        for (b, l, s), u in zip(raw, spread):
            keep = torch.ones_like(s, dtype=torch.bool)
            pseudo.append(PseudoLabels(b, l, s, b, u < method.reg_uncertainty_thr, keep, l))
        return pseudo
    return [PseudoLabels.unpolished(*r) for r in raw]


def _use_polished(polished, method: MethodConfig) -> PseudoLabels:
    """The pseudo labels of one image from its polished ones, as ``method.polish_use`` says."""
    p = polished
    boxes_polished = method.polish_use in ("both", "boxes")
    categories_polished = method.polish_use in ("both", "categories")
    reg_boxes = p.reg_boxes if boxes_polished else p.boxes
    keep, cls_labels = (p.keep, p.cls_labels) if categories_polished else (p.scores > method.det_score_thr, p.labels)
    return PseudoLabels(p.boxes, p.labels, p.scores, reg_boxes, valid_boxes_mask(reg_boxes), keep, cls_labels)


@contextmanager
def _score_threshold(heads, threshold: float):
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


def project_pseudo_labels(pseudo: list[PseudoLabels], weak_to_strong: Tensor, strong_sizes, method: MethodConfig):
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
            labels.classification_keep(method.rpn_pseudo_threshold) & valid,
            labels.classification_keep(method.cls_pseudo_threshold) & valid,
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
        logits, _ = _box_outputs(teacher.detector, out.weak_features, mapped, out.weak_sizes)
        return list(logits.float().softmax(dim=1)[:, 0].split([m.shape[0] for m in mapped]))

    return background_weights


@dataclass
class StepResult:
    """Unweighted losses (attached), detached statistics, and the teacher's output (if any)."""

    losses: dict[str, Tensor]
    stats: dict[str, Tensor]
    teacher: Optional[TeacherOutput] = None


def compute_losses(
    student: nn.Module, teacher: SemiSupervisedModel, labeled: list, unlabeled: list, method: MethodConfig
) -> StepResult:
    """Teacher pseudo labels, then every student loss, for one batch already on the device."""
    images = [item[0] for item in labeled]
    targets = [{"boxes": item[1]["boxes"], "labels": item[1]["labels"]} for item in labeled]
    if not unlabeled:
        # Supervised training still trains polishing networks when the model has them
        # (a burn-in for Polishing Teacher); they learn from teacher features as always.
        polish_inputs = teacher_forward(teacher, images, targets, [], method).polish_inputs if teacher.polisher is not None else None
        losses, stats = student(images, targets, polish_inputs=polish_inputs)
        return StepResult(losses, stats)
    weak = [item[0] for item in unlabeled]
    strong = [item[1] for item in unlabeled]
    out = teacher_forward(teacher, images, targets, [view.image for view in weak], method)
    if method.pseudo_labels == "oracle":
        out.pseudo_labels = oracle_pseudo_labels(unlabeled)
    weak_matrices = torch.stack([view.matrix for view in weak])
    strong_matrices = torch.stack([view.matrix for view in strong])
    strong_sizes = [tuple(view.image.shape[-2:]) for view in strong]
    with record_function("ssod::project_pseudo_labels"):
        weak_to_strong = relative_matrix(weak_matrices, strong_matrices)
        pseudo_targets = project_pseudo_labels(out.pseudo_labels, weak_to_strong, strong_sizes, method)
    background = None
    if method.background_weighting:
        background = make_background_weights(teacher, out, relative_matrix(strong_matrices, weak_matrices))
    losses, stats = student(images, targets, [view.image for view in strong], pseudo_targets, background, out.polish_inputs)
    return StepResult(losses, stats, out)


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


def eval_loader(dataset, indices: list[int], batch_size: int = 4, num_workers: int = 0, pin_memory: bool = False):
    """A reusable loader of ``dataset[indices]`` for ``predict``.

    Build it once per run: its workers persist between evaluations, so an evaluation does
    not pay for starting them again (on a small validation set that was a third of its time).
    They stay alive, idle, between evaluations: ``num_workers`` processes per training process.
    """
    from ssod.data.sampling import worker_loader

    return worker_loader(dataset, num_workers, pin_memory, prefetch_factor=2, batch_size=batch_size, sampler=indices)


def shard(dataset, accelerator) -> list[int]:
    """This process's share of ``dataset``'s indices (every ``num_processes``-th one)."""
    return list(range(accelerator.process_index, len(dataset), accelerator.num_processes))


class EvaluationInterrupted(Exception):
    """A stop was requested during an evaluation, which was cut short (its metrics would be wrong)."""


@torch.no_grad()
def predict(detector: nn.Module, loader, device, should_stop=lambda: False) -> list[dict]:
    """Detections of the images of ``loader`` (see ``eval_loader``) in original-image pixels.

    Returns one dict per image: ``image_id``, ``boxes`` [K, 4] xyxy, ``scores`` [K],
    ``labels`` [K] (contiguous), all on the CPU; an image that could not be read gives
    ``{"image_id": id, "unreadable": True}`` (the loader gave its neighbour instead).
    ``should_stop()`` is asked before each batch; when true, ``EvaluationInterrupted`` is raised.
    """
    was_training = detector.training
    detector.eval()
    results = []
    # Iterating a DataLoader draws its base seed from the global RNG: fork it, so that an
    # evaluation never shifts the training's random stream (a resumed run equals a straight one).
    try:
        with torch.random.fork_rng(devices=[]):
            for items, metas in loader:
                if should_stop():
                    raise EvaluationInterrupted
                outputs = detector([image.to(device, non_blocking=True) for image, _ in items])
                for (_, matrix), meta, (boxes, scores, labels) in zip(items, metas, detections_to_host(outputs)):
                    height, width = meta["size"]
                    inverse = torch.linalg.inv(matrix.double())
                    boxes, _ = project_boxes(boxes, inverse, width, height, min_size=0.0)
                    results.append({"image_id": meta["image_id"], "boxes": boxes, "scores": scores, "labels": labels})
                results.extend({"image_id": image_id, "unreadable": True}
                               for meta in metas for image_id in meta.get("bad_image_ids", ()))
    finally:
        detector.train(was_training)  # a cut-short or failed evaluation too
    return results


def detections_to_host(outputs: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image (boxes [K, 4], scores [K], labels [K] int64) on the CPU, in one copy for the
    batch: one wait for the GPU instead of three per image. Labels travel as float32, exact
    for any class index below 2**24 (boxes and scores are float32 already: Float32Predictor)."""
    packed = torch.cat([
        torch.cat([out["boxes"].float(), out["scores"][:, None].float(), out["labels"][:, None].float()], dim=1)
        for out in outputs
    ]).cpu()
    parts = packed.split([len(out["boxes"]) for out in outputs])
    # Own storage for each (a view would carry the whole batch into every pickled result).
    return [(part[:, :4].clone(), part[:, 4].clone(), part[:, 5].long()) for part in parts]


def evaluate(detector: nn.Module, loader, accelerator, should_stop=lambda: False) -> Optional[dict[str, float]]:
    """COCO bbox metrics of ``detector`` on ``loader.dataset``, computed once on the main process.

    ``loader`` (``eval_loader`` over ``shard(dataset, accelerator)``) yields this process's
    shard; predictions are gathered as objects and evaluated once. Returns the metrics on
    the main process and None elsewhere.
    """
    from ssod.evaluation import coco_evaluate

    dataset = loader.dataset
    predictions = predict(detector, loader, accelerator.device, should_stop)
    gathered = accelerator.gather_for_metrics(predictions, use_gather_object=True)
    if not accelerator.is_main_process:
        return None
    unique, unreadable = {}, set()
    for prediction in gathered:
        if prediction.get("unreadable"):
            unreadable.add(int(prediction["image_id"]))
        else:
            # A corrupt image is replaced by its neighbour in the dataset: count each id once.
            unique.setdefault(int(prediction["image_id"]), prediction)
    # An unreadable image would count all its objects as misses: a lower AP with no sign.
    # It is left out, and the metrics say how many images were evaluated and left out.
    image_ids = [image_id for image_id in dataset.image_ids if image_id not in unreadable]
    if unreadable:
        log.warning("%d validation images could not be read and are left out of the metrics: ids %s",
                    len(unreadable), sorted(unreadable)[:20])
    label_map = dataset.category_map.label_to_category_id
    metrics = coco_evaluate(dataset.coco, list(unique.values()), label_map, image_ids=image_ids)
    return {**metrics, "images": float(len(image_ids)), "unreadable_images": float(len(unreadable))}
