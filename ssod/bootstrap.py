"""COCO AP on resampled test images, and paired bootstrap intervals over seeds and images.

pycocotools matches detections to ground truth per (category, image) (``COCOeval.evaluateImg``),
then accumulates the matches of all images into precision and recall. A match does not depend
on which other images are evaluated, so the AP of a resample of the images is the same matches
re-accumulated, each image counted as often as it was drawn: no detector and no new matching.
``ImageMatches.ap`` with every image counted once is pycocotools' AP exactly
(``tests/test_bootstrap.py``).

The interval of a paired difference (method minus baseline, one pair per seed, all seeds on one
shared test set) resamples both sources of noise: the seeds (each its own labeled split and
training) and the test images (the test set is itself a sample). A replicate draws the seeds
with replacement and one multiset of test images, shared by every seed of that replicate, as a
new test set would be.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssod.evaluation import coco_from_dataset, empty_results, read_detections


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections over all images, in pycocotools' accumulation order.

    scores: [D] descending (stable sort of the images' lists in image order);
    image_index: [D] int, the index into ``ImageMatches.image_ids`` of each detection;
    true_positive / false_positive: [T, D] bool, per IoU threshold (detections matched to an
    ignored ground truth, e.g. a crowd box, are neither); gt_per_image: [N] int, the
    category's ground-truth boxes per image that are not ignored.
    """

    scores: np.ndarray
    image_index: np.ndarray
    true_positive: np.ndarray
    false_positive: np.ndarray
    gt_per_image: np.ndarray


@dataclass(frozen=True)
class ImageMatches:
    """Per-image matches of one detector on one test set (area ``all``, at most 100 per image)."""

    image_ids: list[int]
    categories: list[CategoryMatches]
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray

    @classmethod
    def from_coco(cls, coco_gt: COCO, results: Sequence[Mapping], image_ids: Sequence[int]) -> ImageMatches:
        """Match ``results`` (COCO results: ``image_id``, ``category_id``, ``bbox`` xywh,
        ``score``) against ``coco_gt`` on ``image_ids`` with pycocotools' own matching."""
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco_gt.loadRes(list(results)) if results else empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, detections, iouType="bbox")
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
        params = evaluator.params
        images, areas, max_det = len(params.imgIds), len(params.areaRng), params.maxDets[-1]
        thresholds = len(params.iouThrs)
        categories = []
        for k in range(len(params.catIds)):
            # evalImgs is ordered category, area range, image; area range 0 is "all".
            entries = evaluator.evalImgs[k * areas * images: k * areas * images + images]
            scores, index, matched, ignored = [], [], [], []
            gt_per_image = np.zeros(images, dtype=np.int64)
            for i, entry in enumerate(entries):
                if entry is None:
                    continue
                count = len(entry["dtScores"][:max_det])
                scores.append(np.asarray(entry["dtScores"][:max_det], dtype=np.float64))
                index.append(np.full(count, i, dtype=np.int64))
                matched.append(np.asarray(entry["dtMatches"][:, :max_det]).reshape(thresholds, count) != 0)
                ignored.append(np.asarray(entry["dtIgnore"][:, :max_det]).reshape(thresholds, count).astype(bool))
                gt_per_image[i] = int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
            if not scores:
                scores, index = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
                matched = ignored = [np.zeros((thresholds, 0), dtype=bool)]
            all_scores = np.concatenate(scores)
            order = np.argsort(-all_scores, kind="mergesort")  # pycocotools' order
            matched_all, ignored_all = np.concatenate(matched, axis=1)[:, order], np.concatenate(ignored, axis=1)[:, order]
            categories.append(CategoryMatches(
                scores=all_scores[order], image_index=np.concatenate(index)[order],
                true_positive=matched_all & ~ignored_all, false_positive=~matched_all & ~ignored_all,
                gt_per_image=gt_per_image,
            ))
        return cls([int(i) for i in params.imgIds], categories, np.asarray(params.iouThrs), np.asarray(params.recThrs))

    def ap(self, counts: Optional[np.ndarray] = None, iou: Optional[float] = None) -> float:
        """COCO AP (fraction; ``iou`` 0.5 or 0.75: AP50, AP75) with image ``i`` counted
        ``counts[i]`` times (default once each). NaN when no counted image has ground truth."""
        counts = np.ones(len(self.image_ids)) if counts is None else np.asarray(counts, dtype=np.float64)
        rows = slice(None) if iou is None else np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        precisions = []
        for category in self.categories:
            positives = float(counts @ category.gt_per_image)
            if positives == 0:
                continue  # pycocotools leaves the category out (precision -1)
            weights = counts[category.image_index]
            drawn = weights > 0
            weights = weights[drawn]
            true = np.cumsum(category.true_positive[rows][:, drawn] * weights, axis=1)
            false = np.cumsum(category.false_positive[rows][:, drawn] * weights, axis=1)
            recall = true / positives
            precision = true / (true + false + np.spacing(1))
            # Interpolated precision: the best precision at this recall or beyond.
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            sampled = np.zeros((len(recall), len(self.recall_thresholds)))
            for t in range(len(recall)):
                where = np.searchsorted(recall[t], self.recall_thresholds, side="left")
                inside = where < recall.shape[1]
                sampled[t, inside] = precision[t, where[inside]]
            precisions.append(sampled)
        # [T, R, K], flattened in pycocotools' order: the same sum to the last bit.
        return float(np.mean(np.stack(precisions, axis=-1).ravel())) if precisions else float("nan")


@dataclass(frozen=True)
class Interval:
    """A paired difference: mean over seeds of (method - baseline) on the full test set, its
    95% bootstrap interval, and how many seeds are positive."""

    mean: float
    ci_low: float
    ci_high: float
    positive: int
    seeds: int
    per_seed: dict[int, float]


def paired_bootstrap(pairs: Mapping[int, tuple[ImageMatches, ImageMatches]], iou: Optional[float] = None,
                     replicates: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """The difference ``ap(method) - ap(baseline)`` per seed (``pairs``: seed -> (method,
    baseline) on the same test images), averaged over seeds, with a percentile interval from
    ``replicates`` draws of seeds and test images (see the module docstring)."""
    if not pairs:
        raise ValueError("no paired seeds to compare")
    seeds = sorted(pairs)
    image_ids = pairs[seeds[0]][0].image_ids
    for s in seeds:
        if any(matches.image_ids != image_ids for matches in pairs[s]):
            raise ValueError(f"seed {s}: the two runs were not evaluated on the same test images")
    per_seed = {s: pairs[s][0].ap(iou=iou) - pairs[s][1].ap(iou=iou) for s in seeds}
    rng = np.random.default_rng(seed)
    n_images = len(image_ids)
    draws = np.empty(replicates)
    for r in range(replicates):
        drawn_seeds = rng.choice(seeds, size=len(seeds), replace=True)
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64)
        differences = {s: pairs[s][0].ap(counts, iou) - pairs[s][1].ap(counts, iou) for s in set(drawn_seeds.tolist())}
        draws[r] = np.mean([differences[s] for s in drawn_seeds.tolist()])
    tail = (1 - level) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail])
    return Interval(mean=float(np.mean(list(per_seed.values()))), ci_low=float(low), ci_high=float(high),
                    positive=sum(v > 0 for v in per_seed.values()), seeds=len(seeds), per_seed=per_seed)


@dataclass
class DetectionFiles:
    """``ImageMatches`` of kept detection files (``write_detections``) against their ground-truth
    json, each file read and matched once however many comparisons use it."""

    _truth: dict[str, COCO] = field(default_factory=dict)
    _matches: dict[str, ImageMatches] = field(default_factory=dict)

    def matches(self, detections: str, ground_truth_json: str) -> ImageMatches:
        if detections not in self._matches:
            if ground_truth_json not in self._truth:
                self._truth[ground_truth_json] = coco_from_dataset(json.loads(Path(ground_truth_json).read_text()))
            image_ids, results = read_detections(detections)
            self._matches[detections] = ImageMatches.from_coco(self._truth[ground_truth_json], results, image_ids)
        return self._matches[detections]
