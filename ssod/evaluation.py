"""Detection metrics: COCO bbox mAP through pycocotools, and pseudo-label quality.

Box convention everywhere here: `[N, 4]` float, xyxy, absolute pixels of the image the
ground truth belongs to; labels are contiguous `1..C` (0 is background). Only the COCO
results handed to pycocotools are converted to xywh and to the json's category ids.

Undefined values are NaN, never a silent 0: a COCO metric that pycocotools reports as -1
(no ground truth of that size, or of that class) and a ratio whose denominator is 0.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from ssod.config import COCO_METRIC_NAMES
from ssod.models.boxes import best_overlap, paired_box_iou
from ssod.models.teacher import PseudoLabels

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for bbox evaluation with the default parameters.


def coco_from_dataset(dataset: dict) -> COCO:
    """A pycocotools `COCO` built from an in-memory COCO dict, without its index-building prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    coco_gt: COCO,
    predictions: Sequence[Mapping],
    label_to_category_id: Mapping[int, int],
    *,
    per_class: bool = True,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO bbox metrics of `predictions` against `coco_gt`.

    predictions: one dict per image with `image_id` (int, an id of `coco_gt`), `boxes`
        [K, 4] xyxy absolute pixels, `scores` [K], `labels` [K] contiguous 1..C (tensors
        or arrays). Images of `coco_gt` without a prediction count as all misses.
    label_to_category_id: contiguous label -> the json's category id; a label missing
        from it raises ValueError.
    image_ids: evaluate only these images (default: every image of `coco_gt`).

    Returns `AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100` (floats in [0, 1]) and, when
    `per_class`, `AP/<category name>` (name with characters outside `[A-Za-z0-9_.-]`
    replaced by `_`). A metric without ground truth (e.g. `APl` when there are no large
    objects, or the AP of a class absent from the evaluated images) is NaN. No detections
    at all give 0.0 wherever ground truth exists. The printed pycocotools summary is logged
    at DEBUG; `coco_evaluate_with_summary` returns it.
    """
    metrics, _ = coco_evaluate_with_summary(
        coco_gt, predictions, label_to_category_id, per_class=per_class, image_ids=image_ids
    )
    return metrics


def coco_evaluate_with_summary(
    coco_gt: COCO,
    predictions: Sequence[Mapping],
    label_to_category_id: Mapping[int, int],
    *,
    per_class: bool = True,
    image_ids: Iterable[int] | None = None,
) -> tuple[dict[str, float], str]:
    """`coco_evaluate`, plus the text pycocotools prints (its 12-line summary)."""
    annotation_ids = [annotation["id"] for annotation in coco_gt.dataset.get("annotations", [])]
    if len(set(annotation_ids)) != len(annotation_ids) or min(annotation_ids, default=1) < 1:
        # COCOeval keys matches by annotation id and reads id 0 as "unmatched": silently wrong.
        raise ValueError("ground-truth annotation ids must be unique and >= 1")
    known_categories = set(coco_gt.getCatIds())
    unknown = sorted(set(label_to_category_id.values()) - known_categories)
    if unknown:
        raise ValueError(f"label_to_category_id maps to category ids {unknown} absent from coco_gt")
    results = predictions_to_coco_results(predictions, label_to_category_id)
    known_images = set(coco_gt.getImgIds())
    stray = sorted({r["image_id"] for r in results} - known_images)
    if stray:
        raise ValueError(f"predictions for image ids {stray[:10]} absent from the ground truth")

    evaluator, summary = run_cocoeval(coco_gt, results, known_images if image_ids is None else image_ids)

    metrics = {name: _undefined_as_nan(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}
    if per_class:
        metrics.update(_per_class_ap(coco_gt, evaluator))
    return metrics, summary


def run_cocoeval(coco_gt: COCO, results: list[dict], image_ids: Iterable[int]) -> tuple[COCOeval, str]:
    """pycocotools' bbox evaluation of COCO ``results`` (xywh, the json's category ids) on
    ``image_ids``, accumulated and summarised: the ``COCOeval`` (its ``eval["precision"]``
    is ``[IoU thresholds, recall thresholds, categories, areas, max dets]``) and its printed summary."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # loadRes adds keys (area, id, segmentation) to the dicts it is given: give it copies.
        coco_dt = coco_gt.loadRes([dict(result) for result in results]) if results else empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = printed.getvalue()
    logger.debug("pycocotools summary:\n%s", summary)
    return evaluator, summary


def predictions_to_coco_results(
    predictions: Sequence[Mapping], label_to_category_id: Mapping[int, int]
) -> list[dict]:
    """Per-image xyxy predictions -> COCO result dicts (`bbox` xywh, json category ids)."""
    results = []
    for prediction in predictions:
        boxes = _numpy(prediction["boxes"]).reshape(-1, 4).astype(np.float64)
        scores = _numpy(prediction["scores"]).reshape(-1)
        labels = _numpy(prediction["labels"]).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {prediction['image_id']}: boxes, scores, labels differ in length")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            if int(label) not in label_to_category_id:
                raise ValueError(
                    f"label {int(label)} has no category id in label_to_category_id "
                    f"(known labels: {sorted(label_to_category_id)})"
                )
            results.append({
                "image_id": int(prediction["image_id"]),
                "category_id": int(label_to_category_id[int(label)]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score),
            })
    return results


def write_detections(path, predictions: Sequence[Mapping], label_to_category_id: Mapping[int, int],
                     image_ids: Sequence[int]) -> None:
    """Detections as gzipped json, atomically: ``{"image_ids": [...], "results": [...]}``, the
    evaluated images and COCO results (``bbox`` xywh, the json's category ids), at full precision."""
    from ssod.io import write_bytes_atomic

    document = {"image_ids": [int(i) for i in image_ids],
                "results": predictions_to_coco_results(predictions, label_to_category_id)}
    write_bytes_atomic(gzip.compress(json.dumps(document, separators=(",", ":")).encode(), mtime=0), path)


def read_detections(path) -> tuple[list[int], list[dict]]:
    """``(image_ids, results)`` of ``write_detections``; a missing or corrupt file raises
    ``ValueError`` naming it."""
    try:
        document = json.loads(gzip.decompress(Path(path).read_bytes()))
        return document["image_ids"], document["results"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a detections file written by ssod ({error})") from error


def empty_results(coco_gt: COCO) -> COCO:
    """A result set without detections (``loadRes`` fails on an empty list; this one scores 0)."""
    return coco_from_dataset({
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    })


def _per_class_ap(coco_gt: COCO, evaluator: COCOeval) -> dict[str, float]:
    # precision: [IoU thresholds, recall thresholds, classes, area ranges, max dets];
    # area "all" is index 0, and the last max-dets setting (100) is COCO's AP.
    precision = evaluator.eval["precision"]
    metrics = {}
    for index, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        name = _metric_safe(coco_gt.loadCats([category_id])[0]["name"])
        metrics[f"AP/{name}"] = float(values.mean()) if values.size else math.nan
    return metrics


def _metric_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def _undefined_as_nan(value: float) -> float:
    return math.nan if value < 0 else float(value)


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def match_greedy(
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    *,
    pred_labels: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    pred_scores: torch.Tensor | None = None,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """One-to-one greedy matching of predictions to ground truth.

    pred_boxes [K, 4], gt_boxes [G, 4]: xyxy, same frame. With labels (both or neither),
    a prediction may only match a ground truth of its own label. Predictions are visited
    in descending `pred_scores` order (given order when None, ties keep given order); each
    takes the still-unmatched ground truth of highest IoU, if that IoU >= iou_threshold.

    Returns [K] int64: the matched ground-truth index, or -1.
    """
    if (pred_labels is None) != (gt_labels is None):
        raise ValueError("give both pred_labels and gt_labels, or neither")
    matches = torch.full((len(pred_boxes),), -1, dtype=torch.int64)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return matches
    iou = box_iou(pred_boxes.float(), gt_boxes.float())
    if pred_labels is not None:
        same_label = pred_labels.view(-1, 1) == gt_labels.view(1, -1)
        iou = torch.where(same_label, iou, torch.full_like(iou, -1.0))
    order = (torch.argsort(pred_scores, descending=True, stable=True) if pred_scores is not None
             else torch.arange(len(pred_boxes)))
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for index in order.tolist():
        candidates = iou[index].masked_fill(taken, -1.0)
        best_iou, best = candidates.max(dim=0)
        if best_iou >= iou_threshold:
            matches[index] = best
            taken[best] = True
    return matches


# The names runs logged before the measure came first (old name -> new name), for tools
# that read older runs.
RENAMED_PSEUDO = {
    **{f"pseudo/{kind}/num_per_image": f"pseudo/num_per_image/{kind}" for kind in ("raw", "cls", "reg")},
    **{f"pseudo/{kind}/{measure}": f"pseudo/{measure}/{kind}" for kind in ("raw", "cls")
       for measure in ("precision", "recall")},
    **{f"pseudo/{kind}/{measure}": f"pseudo/{measure}/{kind}" for kind in ("raw", "polished")
       for measure in ("iou_mean", "label_acc")},
}

_COUNTERS = (
    "images", "raw", "kept", "gt", "raw_true_positive", "cls_true_positive",
    "localised", "raw_iou_sum", "polished_iou_sum",
    "labelled", "raw_label_right", "polished_label_right", "wrong_to_right", "right_to_wrong",
)


class PseudoLabelQuality:
    """Quality of pseudo labels against the hidden ground truth, accumulated over an interval.

    Per image, all boxes xyxy absolute pixels in one frame (the ground truth's):
    raw_boxes [K, 4] and raw_labels [K] (teacher detections above the initial score
    threshold), raw_scores [K] optional (orders greedy matching), polished_boxes [K, 4]
    (the regression pseudo labels: raw boxes moved by the box-polishing net, same order),
    keep [K] bool (the classification set is the raw boxes where keep), polished_labels [K]
    (labels after category polishing, read only where keep), gt_boxes [G, 4], gt_labels [G].

    `compute()` keys, the measure before the set (so that MLflow puts the sets of one measure
    in one chart section): `pseudo/num_per_image/{raw,cls,reg}`, `pseudo/keep_ratio`,
    `pseudo/{precision,recall}/{raw,cls}` (class-aware one-to-one greedy matching at
    IoU >= 0.5), `pseudo/iou_mean/{raw,polished}` (raw boxes whose best class-agnostic
    ground-truth IoU >= 0.5: IoU of the raw box and of its polished box with that same
    ground truth), `pseudo/label_acc/{raw,polished}` (kept boxes with such a ground truth:
    fraction whose raw / polished label is its label), `pseudo/relabel/wrong_to_right` and
    `pseudo/relabel/right_to_wrong` (counts of such boxes whose label polishing fixed /
    broke the label), `pseudo/images`. A ratio with a zero denominator is NaN.
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        self._totals = dict.fromkeys(_COUNTERS, 0.0)

    @torch.no_grad()
    def update(self, pseudo: PseudoLabels, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
               cls_threshold: float = float("-inf")) -> None:
        """One image's pseudo labels (weak view) against its hidden ground truth in that view:
        raw boxes and labels, regression boxes (``reg_boxes``), and the classification pseudo
        labels (``classification_keep(cls_threshold)``, with ``cls_labels``)."""
        self._update(pseudo.boxes, pseudo.labels, pseudo.reg_boxes, pseudo.classification_keep(cls_threshold),
                     pseudo.cls_labels, gt_boxes, gt_labels, pseudo.scores)

    def _update(
        self,
        raw_boxes: torch.Tensor,
        raw_labels: torch.Tensor,
        polished_boxes: torch.Tensor,
        keep: torch.Tensor,
        polished_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        raw_scores: torch.Tensor | None = None,
    ) -> None:
        raw_boxes, polished_boxes, gt_boxes = (
            _cpu(boxes).float().reshape(-1, 4) for boxes in (raw_boxes, polished_boxes, gt_boxes)
        )
        raw_labels, polished_labels, gt_labels = (
            _cpu(labels).reshape(-1) for labels in (raw_labels, polished_labels, gt_labels)
        )
        keep = _cpu(keep).reshape(-1).bool()
        scores = None if raw_scores is None else _cpu(raw_scores).reshape(-1)
        count = len(raw_boxes)
        per_raw_box = [raw_labels, polished_boxes, keep, polished_labels]
        per_raw_box += [scores] if scores is not None else []
        if {len(values) for values in per_raw_box} - {count} or len(gt_labels) != len(gt_boxes):
            raise ValueError("raw/polished boxes, labels, keep, scores need one row per raw box; "
                             "gt boxes and labels one row per object")

        totals = self._totals
        totals["images"] += 1
        totals["raw"] += count
        totals["kept"] += int(keep.sum())
        totals["gt"] += len(gt_boxes)
        matching = {"gt_boxes": gt_boxes, "gt_labels": gt_labels, "iou_threshold": self.iou_threshold}
        raw_matches = match_greedy(raw_boxes, pred_labels=raw_labels, pred_scores=scores, **matching)
        totals["raw_true_positive"] += int((raw_matches >= 0).sum())
        cls_matches = match_greedy(raw_boxes[keep], pred_labels=polished_labels[keep],
                                   pred_scores=None if scores is None else scores[keep], **matching)
        totals["cls_true_positive"] += int((cls_matches >= 0).sum())
        self._count_polishing(
            raw_boxes, raw_labels, polished_boxes, keep, polished_labels, gt_boxes, gt_labels
        )

    def _count_polishing(
        self, raw_boxes, raw_labels, polished_boxes, keep, polished_labels, gt_boxes, gt_labels
    ) -> None:
        """Box and label polishing, judged on raw boxes near a ground truth (class-agnostic)."""
        totals = self._totals
        best_iou, best = best_overlap(raw_boxes, gt_boxes)
        localised = best_iou >= self.iou_threshold
        totals["localised"] += int(localised.sum())
        totals["raw_iou_sum"] += float(best_iou[localised].sum())
        polished_iou = paired_box_iou(polished_boxes[localised], gt_boxes[best[localised]])
        totals["polished_iou_sum"] += float(polished_iou.sum())

        labelled = localised & keep
        true_labels = gt_labels[best[labelled]]
        raw_right = raw_labels[labelled] == true_labels
        polished_right = polished_labels[labelled] == true_labels
        totals["labelled"] += int(labelled.sum())
        totals["raw_label_right"] += int(raw_right.sum())
        totals["polished_label_right"] += int(polished_right.sum())
        totals["wrong_to_right"] += int((~raw_right & polished_right).sum())
        totals["right_to_wrong"] += int((raw_right & ~polished_right).sum())

    def compute(self) -> dict[str, float]:
        totals = self._totals

        def ratio(numerator: str, denominator: str) -> float:
            return totals[numerator] / totals[denominator] if totals[denominator] else math.nan

        # Without hidden ground truth (an unlabeled set that really is unlabeled, or an
        # interval of empty images) every pseudo box would count as a false positive: the
        # quality figures are NaN then (not logged), the counts stay.
        judged = totals["gt"] > 0

        def quality(value: float) -> float:
            return value if judged else math.nan

        return {
            "pseudo/num_per_image/raw": ratio("raw", "images"),
            "pseudo/num_per_image/cls": ratio("kept", "images"),
            # The regression set is every raw box, moved: same count by construction.
            "pseudo/num_per_image/reg": ratio("raw", "images"),
            "pseudo/keep_ratio": ratio("kept", "raw"),
            "pseudo/precision/raw": quality(ratio("raw_true_positive", "raw")),
            "pseudo/recall/raw": ratio("raw_true_positive", "gt"),
            "pseudo/precision/cls": quality(ratio("cls_true_positive", "kept")),
            "pseudo/recall/cls": ratio("cls_true_positive", "gt"),
            "pseudo/iou_mean/raw": quality(ratio("raw_iou_sum", "localised")),
            "pseudo/iou_mean/polished": quality(ratio("polished_iou_sum", "localised")),
            "pseudo/label_acc/raw": quality(ratio("raw_label_right", "labelled")),
            "pseudo/label_acc/polished": quality(ratio("polished_label_right", "labelled")),
            "pseudo/relabel/wrong_to_right": quality(float(totals["wrong_to_right"])),
            "pseudo/relabel/right_to_wrong": quality(float(totals["right_to_wrong"])),
            "pseudo/images": float(totals["images"]),
        }


def _cpu(values) -> torch.Tensor:
    return values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
