"""Re-accumulated COCO AP equals pycocotools'; paired bootstrap intervals behave."""

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from ssod.bootstrap import ImageMatches, paired_bootstrap
from ssod.evaluation import coco_from_dataset


def ground_truth(rng: np.random.Generator, images: int = 40) -> dict:
    """Random boxes of 3 categories (one never present), some crowd, some images empty."""
    annotations = []
    for image_id in range(1, images + 1):
        for _ in range(int(rng.integers(0, 5))):
            x, y, w, h = rng.uniform(0, 80, 2).tolist() + rng.uniform(4, 40, 2).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice([1, 3])),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
    return {"images": [{"id": i, "width": 128, "height": 128} for i in range(1, images + 1)],
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)], "annotations": annotations}


def detections(rng: np.random.Generator, gt: dict, noise: float) -> list[dict]:
    """Jittered copies of the ground truth (some relabelled) and random false positives."""
    results = []
    for annotation in gt["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = np.asarray(annotation["bbox"]) + rng.normal(0, noise, 4)
            category = annotation["category_id"] if rng.random() < 0.9 else 2
            results.append({"image_id": annotation["image_id"], "category_id": category,
                            "bbox": [x, y, max(w, 1), max(h, 1)], "score": float(rng.random())})
    for image in gt["images"]:
        for _ in range(int(rng.integers(0, 3))):
            x, y, w, h = rng.uniform(0, 80, 2).tolist() + rng.uniform(4, 40, 2).tolist()
            results.append({"image_id": image["id"], "category_id": int(rng.choice([1, 2, 3])),
                            "bbox": [x, y, w, h], "score": float(rng.random())})
    return results


def pycocotools_stats(coco, results, image_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_image_once_gives_pycocotools_ap_ap50_ap75_exactly(seed):
    rng = np.random.default_rng(seed)
    gt = ground_truth(rng)
    coco = coco_from_dataset(gt)
    results = detections(rng, gt, noise=3.0)
    ids = [image["id"] for image in gt["images"]]
    stats = pycocotools_stats(coco, results, ids)
    matches = ImageMatches.from_coco(coco, results, ids)
    assert matches.ap() == stats[0] and matches.ap(iou=0.5) == stats[1] and matches.ap(iou=0.75) == stats[2]


def test_counting_an_image_twice_is_evaluating_a_test_set_that_holds_it_twice():
    """The resampled AP equals pycocotools' on a test set with the drawn images duplicated
    under new ids (up to the order of equal scores, which random scores do not have)."""
    rng = np.random.default_rng(3)
    gt = ground_truth(rng, images=20)
    results = detections(rng, gt, noise=3.0)
    counts = np.bincount(rng.integers(0, 20, 20), minlength=20)
    duplicated = {"images": [], "categories": gt["categories"], "annotations": []}
    duplicated_results = []
    for index, count in enumerate(counts):
        for copy in range(count):
            new_id = 1000 * (copy + 1) + index + 1
            duplicated["images"].append({"id": new_id, "width": 128, "height": 128})
            for annotation in gt["annotations"]:
                if annotation["image_id"] == index + 1:
                    duplicated["annotations"].append({**annotation, "id": len(duplicated["annotations"]) + 1,
                                                      "image_id": new_id})
            duplicated_results += [{**r, "image_id": new_id} for r in results if r["image_id"] == index + 1]
    expected = pycocotools_stats(coco_from_dataset(duplicated), duplicated_results,
                                 [image["id"] for image in duplicated["images"]])[0]
    matches = ImageMatches.from_coco(coco_from_dataset(gt), results, list(range(1, 21)))
    assert matches.ap(counts) == pytest.approx(expected, abs=1e-12)


def test_no_detections_score_zero_and_images_without_ground_truth_nan():
    rng = np.random.default_rng(4)
    gt = ground_truth(rng, images=10)
    coco = coco_from_dataset(gt)
    with_objects = [i for i in range(1, 11) if coco.getAnnIds(imgIds=[i], iscrowd=False)]
    without = [i for i in range(1, 11) if not coco.getAnnIds(imgIds=[i])]
    assert with_objects and without
    assert ImageMatches.from_coco(coco, [], with_objects).ap() == 0.0
    assert math.isnan(ImageMatches.from_coco(coco, [], without).ap())


def test_paired_bootstrap_identical_runs_give_zero_and_a_better_detector_an_interval_above_zero():
    rng = np.random.default_rng(5)
    gt = ground_truth(rng, images=60)
    coco = coco_from_dataset(gt)
    ids = [image["id"] for image in gt["images"]]
    pairs_same, pairs_better = {}, {}
    for s in range(3):
        good = ImageMatches.from_coco(coco, detections(rng, gt, noise=1.0), ids)
        bad = ImageMatches.from_coco(coco, detections(rng, gt, noise=6.0), ids)
        pairs_same[s], pairs_better[s] = (good, good), (good, bad)
    same = paired_bootstrap(pairs_same, replicates=50)
    assert same.mean == 0 and same.ci_low == 0 and same.ci_high == 0 and same.positive == 0
    better = paired_bootstrap(pairs_better, replicates=200)
    assert better.ci_low > 0 and better.positive == 3 and better.ci_low < better.mean < better.ci_high
    assert better.mean == pytest.approx(np.mean(list(better.per_seed.values())))
    # The images are part of the noise: one seed still has an interval of nonzero width.
    single = paired_bootstrap({0: pairs_better[0]}, replicates=200)
    assert single.ci_high - single.ci_low > 0.005


def test_paired_bootstrap_refuses_runs_on_different_images():
    rng = np.random.default_rng(6)
    gt = ground_truth(rng, images=10)
    coco = coco_from_dataset(gt)
    a = ImageMatches.from_coco(coco, detections(rng, gt, 2.0), list(range(1, 11)))
    b = ImageMatches.from_coco(coco, detections(rng, gt, 2.0), list(range(1, 10)))
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap({0: (a, b)})
