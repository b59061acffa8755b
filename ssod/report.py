"""An evaluation as a detection user reads it: the per-class AP table in %, precision-recall
curves and a confusion matrix, written to a folder and logged to MLflow.

Built from COCO results (``bbox`` xywh in the ground truth's pixels, the json's category
ids, ``score``) and the images they were evaluated on, as ``write_detections`` keeps them:
``ssod-eval`` and the end of a training run (``log_final_reports``) make the same report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from ssod.evaluation import match_greedy, read_detections, run_cocoeval

log = logging.getLogger(__name__)

# Where a finished run keeps its final validation detections, beside its checkpoints
# (``<output_dir>/val_detections/{teacher,student}.json.gz``).
VAL_DETECTIONS = "val_detections"
IOU_THRESHOLD = 0.5  # a detection matches an object at this IoU (confusion matrix)
CONFUSION_SCORE = 0.5  # the score a detection needs to count in the confusion matrix
REPORT_FILES = ("per_class_ap.txt", "pr_curves.png", "confusion_matrix.png")


@dataclass
class DetectionReport:
    """rows: one dict per class then ``all`` (``class``, ``objects``, ``detections``, ``AP``,
    ``AP50``, ``AP75``, ``AR100``; APs in [0, 1], NaN without ground truth); confusion:
    [C + 1, C + 1] counts, rows predicted, columns true, the last of each background."""

    names: list[str]
    rows: list[dict]
    recall: np.ndarray  # [R] COCO's recall thresholds
    precision: dict[str, np.ndarray]  # "IoU 0.50" / "IoU 0.75" -> [R, C], NaN for a class without ground truth
    confusion: np.ndarray
    confusion_score: float

    def table(self) -> str:
        """The per-class table, AP in % with one decimal (``-``: no ground truth)."""
        width = max(len("class"), *(len(row["class"]) for row in self.rows))
        lines = [f"{'class':<{width}}  objects  detections     AP   AP50   AP75  AR100"]
        for row in self.rows:
            numbers = "".join(f"{'-' if math.isnan(row[key]) else f'{100 * row[key]:.1f}':>7}"
                              for key in ("AP", "AP50", "AP75", "AR100"))
            lines.append(f"{row['class']:<{width}}  {row['objects']:>7}  {row['detections']:>10}{numbers}")
        return "\n".join(lines)

    def pictures(self) -> dict:
        """``pr_curves.png`` and ``confusion_matrix.png`` as PIL images."""
        from ssod.plots import confusion_picture, pr_curves_picture

        average_precision = {"IoU 0.50": [row["AP50"] for row in self.rows[:-1]],
                             "IoU 0.75": [row["AP75"] for row in self.rows[:-1]]}
        return {"pr_curves.png": pr_curves_picture(self.recall, self.precision, self.names, average_precision),
                "confusion_matrix.png": confusion_picture(self.confusion, self.names, self.confusion_score,
                                                          IOU_THRESHOLD)}


def build_report(coco_gt: COCO, results: list[dict], image_ids: list[int],
                 confusion_score: float = CONFUSION_SCORE) -> DetectionReport:
    """The report of ``results`` on ``image_ids`` of ``coco_gt`` (classes in category id order)."""
    evaluator, _ = run_cocoeval(coco_gt, results, image_ids)
    category_ids = list(evaluator.params.catIds)
    names = [coco_gt.cats[i]["name"] for i in category_ids]
    # [IoU thresholds 0.50:0.95, recall thresholds, classes, area "all", max dets 100]; -1: no ground truth.
    precision = np.where(evaluator.eval["precision"][:, :, :, 0, -1] < 0, np.nan, evaluator.eval["precision"][:, :, :, 0, -1])
    recall = np.where(evaluator.eval["recall"][:, :, 0, -1] < 0, np.nan, evaluator.eval["recall"][:, :, 0, -1])
    evaluated = set(image_ids)
    objects = {i: 0 for i in category_ids}
    for annotation in coco_gt.dataset.get("annotations", []):
        if annotation["image_id"] in evaluated and not annotation.get("iscrowd", 0):
            objects[annotation["category_id"]] += 1
    detections = {i: 0 for i in category_ids}
    for result in results:
        detections[result["category_id"]] += 1
    rows = [{"class": name, "objects": objects[i], "detections": detections[i],
             "AP": _mean(precision[:, :, k]), "AP50": _mean(precision[0, :, k]), "AP75": _mean(precision[5, :, k]),
             "AR100": _mean(recall[:, k])} for k, (i, name) in enumerate(zip(category_ids, names))]
    stats = [math.nan if value < 0 else float(value) for value in evaluator.stats]
    rows.append({"class": "all", "objects": sum(objects.values()), "detections": len(results),
                 "AP": stats[0], "AP50": stats[1], "AP75": stats[2], "AR100": stats[8]})
    confusion = confusion_matrix(coco_gt, results, image_ids, category_ids, confusion_score)
    return DetectionReport(names, rows, np.asarray(evaluator.params.recThrs), {
        "IoU 0.50": precision[0], "IoU 0.75": precision[5]}, confusion, confusion_score)


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else math.nan


def confusion_matrix(coco_gt: COCO, results: list[dict], image_ids: list[int], category_ids: list[int],
                     score_threshold: float = CONFUSION_SCORE, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """[C + 1, C + 1] counts over ``image_ids``: rows the predicted class, columns the true
    class, index C background. Per image, detections scoring >= ``score_threshold`` are
    matched one-to-one to objects whatever their class (greedy by score, IoU >=
    ``iou_threshold``): a pair counts at (predicted, true), a detection left over at
    (predicted, background), an object left over at (background, true). Crowd regions
    (``iscrowd``) are no objects; a detection left over on one (IoU >= the threshold) is not counted."""
    index = {category_id: k for k, category_id in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for result in results:
        if result["score"] >= score_threshold:
            by_image.setdefault(result["image_id"], []).append(result)
    for image_id in image_ids:
        annotations = coco_gt.imgToAnns.get(image_id, [])
        objects = [a for a in annotations if not a.get("iscrowd", 0)]
        crowds = [a for a in annotations if a.get("iscrowd", 0)]
        found = by_image.get(image_id, [])
        predicted = torch.tensor([index[r["category_id"]] for r in found], dtype=torch.int64)
        matches = match_greedy(_xyxy(found), _xyxy(objects), pred_scores=torch.tensor([r["score"] for r in found]),
                               iou_threshold=iou_threshold)
        true = [index[a["category_id"]] for a in objects]
        matched = set()
        on_crowd = (box_iou(_xyxy(found), _xyxy(crowds)).max(dim=1).values >= iou_threshold) if crowds and found \
            else torch.zeros(len(found), dtype=torch.bool)
        for k, match in enumerate(matches.tolist()):
            if match >= 0:
                matrix[predicted[k], true[match]] += 1
                matched.add(match)
            elif not on_crowd[k]:
                matrix[predicted[k], background] += 1
        for k, label in enumerate(true):
            if k not in matched:
                matrix[background, label] += 1
    return matrix


def _xyxy(items: list[dict]) -> torch.Tensor:
    boxes = torch.tensor([item["bbox"] for item in items], dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def write_report(report: DetectionReport, folder: Path) -> list[Path]:
    """``per_class_ap.txt``, ``pr_curves.png`` and ``confusion_matrix.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "per_class_ap.txt").write_text(report.table() + "\n")
    for name, picture in report.pictures().items():
        picture.save(folder / name)
    return [folder / name for name in REPORT_FILES]


def log_report(tracker, report: DetectionReport, artifact_dir: str) -> None:
    """The report's table and pictures as artifacts under ``artifact_dir`` of the tracker's run."""
    tracker.log_text(report.table() + "\n", f"{artifact_dir}/per_class_ap.txt")
    for name, picture in report.pictures().items():
        tracker.log_image(picture, f"{artifact_dir}/{name}")


def log_final_reports(tracker, sets: Mapping[str, tuple[Optional[object], Path]]) -> None:
    """End of training: for each ``name -> (dataset, detections folder)`` whose
    ``teacher.json.gz`` exists (``write_detections``), the teacher's report under
    ``evaluation/<name>/teacher``. A report that cannot be made is a warning, never the end
    of a finished run."""
    if not tracker.enabled:
        return
    for name, (dataset, folder) in sets.items():
        detections = folder / "teacher.json.gz"
        if dataset is None or not detections.is_file():
            continue
        try:
            image_ids, results = read_detections(detections)
            log_report(tracker, build_report(dataset.coco, results, image_ids), f"evaluation/{name}/teacher")
        except Exception as error:  # noqa: BLE001 (the run's results are already safe)
            log.warning("the %s set's evaluation report was not logged (%s: %s)", name, type(error).__name__, error)


# Where the picture of pseudo-label quality over training goes (beside the pseudo-label pictures).
BEFORE_AFTER_PICTURE = "pseudo_labels/before_after_polishing.png"


def log_before_after(tracker) -> None:
    """End of training: pseudo-label quality before and after polishing over the run's
    intervals (``plots.before_after_picture``, from the store's history), when it has any
    (a semi-supervised run with hidden ground truth). A warning, never the end of the run."""
    from ssod.plots import BEFORE_AFTER, before_after_picture

    if not tracker.enabled:
        return
    names = [f"{prefix}/{kind}" for _, prefix in BEFORE_AFTER for kind in ("raw", "polished")]
    histories = {name: tracker.metric_history(name) for name in names}
    if not any(histories.values()):
        return
    try:
        tracker.log_image(before_after_picture(histories), BEFORE_AFTER_PICTURE)
    except Exception as error:  # noqa: BLE001 (the run's results are already safe)
        log.warning("the picture of pseudo-label quality over training was not logged (%s: %s)", type(error).__name__, error)
