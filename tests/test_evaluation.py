import math

import pytest
import torch

from ssod.models.teacher import PseudoLabels
from ssod.evaluation import (
    PseudoLabelQuality,
    coco_evaluate,
    coco_evaluate_with_summary,
    coco_from_dataset,
    match_greedy,
)

# Non-contiguous category ids, as in real COCO json; labels 1..3 map onto them.
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "traffic light"}]
LABEL_TO_CATEGORY = {1: 1, 2: 7, 3: 90}
# image id -> [(category id, xywh)]; medium (40 px) and large (100 px) objects only.
OBJECTS = {
    1: [(1, [10, 10, 40, 40]), (7, [80, 20, 100, 100])],
    2: [(90, [5, 50, 40, 40]), (1, [100, 100, 40, 40])],
    3: [(7, [30, 30, 40, 40])],
}


@pytest.fixture
def coco_gt():
    rows = [(image_id, category_id, box)
            for image_id, objects in OBJECTS.items() for category_id, box in objects]
    annotations = [
        {"id": index, "image_id": image_id, "category_id": category_id, "bbox": box, "area": box[2] * box[3],
         "iscrowd": 0}
        for index, (image_id, category_id, box) in enumerate(rows, start=1)
    ]
    return coco_from_dataset({
        "images": [{"id": i, "width": 240, "height": 240, "file_name": f"{i}.jpg"} for i in OBJECTS],
        "annotations": annotations,
        "categories": CATEGORIES,
    })


def _predictions(shift=0.0, image_ids=tuple(OBJECTS), label_of=None):
    label_of = label_of or {c: label for label, c in LABEL_TO_CATEGORY.items()}
    predictions = []
    for image_id in image_ids:
        boxes = torch.tensor([[x + shift, y, x + w + shift, y + h] for _, (x, y, w, h) in OBJECTS[image_id]])
        labels = torch.tensor([label_of[c] for c, _ in OBJECTS[image_id]])
        scores = torch.ones(len(boxes))
        predictions.append({"image_id": image_id, "boxes": boxes, "scores": scores, "labels": labels})
    return predictions


def test_perfect_predictions_score_one(coco_gt):
    metrics = coco_evaluate(coco_gt, _predictions(), LABEL_TO_CATEGORY)
    for name in ("AP", "AP50", "AP75", "APm", "APl", "AR100", "AP/cat", "AP/dog", "AP/traffic_light"):
        assert metrics[name] == pytest.approx(1.0), name
    assert math.isnan(metrics["APs"])  # no small objects: undefined, not 0
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                            "AP/cat", "AP/dog", "AP/traffic_light"}
    assert all(isinstance(value, float) for value in metrics.values())


def test_wrong_label_mapping_scores_zero(coco_gt):
    # Labels shifted by one class: every box is found, with the wrong category.
    shifted = {1: 2, 7: 3, 90: 1}
    metrics = coco_evaluate(coco_gt, _predictions(label_of=shifted), LABEL_TO_CATEGORY)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_shifted_boxes_score_less(coco_gt):
    # An 8 px shift gives IoU 2/3 on the 40 px boxes and 0.85 on the 100 px one.
    metrics = coco_evaluate(coco_gt, _predictions(shift=8.0), LABEL_TO_CATEGORY)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert 0.0 < metrics["AP"] < 1.0
    assert metrics["APm"] < metrics["APl"]


def test_numpy_predictions_are_accepted(coco_gt):
    predictions = [{key: (value.numpy() if torch.is_tensor(value) else value) for key, value in p.items()}
                   for p in _predictions()]
    assert coco_evaluate(coco_gt, predictions, LABEL_TO_CATEGORY, per_class=False)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("predictions", [
    [],
    [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
      "labels": torch.zeros(0, dtype=torch.int64)}],
])
def test_no_detections_score_zero_without_crashing(coco_gt, predictions):
    metrics = coco_evaluate(coco_gt, predictions, LABEL_TO_CATEGORY)
    defined = {name: value for name, value in metrics.items() if name != "APs"}
    assert defined == dict.fromkeys(defined, 0.0)
    assert math.isnan(metrics["APs"])


def test_missing_images_count_as_misses_unless_restricted(coco_gt):
    only_first = _predictions(image_ids=[1])
    everywhere = coco_evaluate(coco_gt, only_first, LABEL_TO_CATEGORY)
    # Recall per class: cat 1/2, dog 1/2, traffic light 0.
    assert everywhere["AR100"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    restricted = coco_evaluate(coco_gt, only_first, LABEL_TO_CATEGORY, image_ids=[1])
    assert restricted["AP"] == pytest.approx(1.0)
    assert math.isnan(restricted["AP/traffic_light"])  # no such object in image 1


def test_unmapped_label_and_unknown_category_raise(coco_gt):
    with pytest.raises(ValueError, match="label 3"):
        coco_evaluate(coco_gt, _predictions(), {1: 1, 2: 7})
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(coco_gt, _predictions(), {1: 1, 2: 7, 3: 3})
    stray = _predictions(image_ids=[1])
    stray[0]["image_id"] = 42
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(coco_gt, stray, LABEL_TO_CATEGORY)


def test_broken_annotation_ids_are_refused():
    dataset = {"images": [{"id": 1, "width": 50, "height": 50}], "categories": CATEGORIES[:1],
               "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "area": 81,
                                "iscrowd": 0} for i in (0, 1)]}
    with pytest.raises(ValueError, match="annotation ids"):
        coco_evaluate(coco_from_dataset(dataset), [], {1: 1})


def test_summary_is_returned_not_printed(coco_gt, capsys):
    _, summary = coco_evaluate_with_summary(coco_gt, _predictions(), LABEL_TO_CATEGORY)
    assert "Average Precision" in summary
    assert capsys.readouterr().out == ""


def test_match_greedy_visits_predictions_by_score():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    predictions = torch.tensor([[0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 10.0]])
    assert match_greedy(predictions, gt).tolist() == [0, -1]
    assert match_greedy(predictions, gt, pred_scores=torch.tensor([0.3, 0.9])).tolist() == [-1, 0]


def test_match_greedy_is_class_aware_and_one_to_one():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    predictions = torch.tensor([[1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    # Without labels the first takes its exact twin, the second the other gt, the third nothing.
    assert match_greedy(predictions, gt).tolist() == [1, 0, -1]
    labels = dict(pred_labels=torch.tensor([1, 2, 1]), gt_labels=torch.tensor([1, 2]))
    assert match_greedy(predictions, gt, **labels).tolist() == [0, 1, -1]
    # At 0.95 the off-by-one-pixel pairs (IoU 9/11) no longer match.
    assert match_greedy(predictions, gt, iou_threshold=0.95).tolist() == [1, -1, 0]
    assert match_greedy(predictions, gt, iou_threshold=0.99, **labels).tolist() == [-1, 1, 0]
    assert match_greedy(predictions, torch.zeros(0, 4)).tolist() == [-1, -1, -1]
    assert match_greedy(torch.zeros(0, 4), gt).tolist() == []
    with pytest.raises(ValueError):
        match_greedy(predictions, gt, pred_labels=labels["pred_labels"])


def _two_images(quality: PseudoLabelQuality) -> None:
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    gt_labels = torch.tensor([1, 2, 3])
    raw_boxes = torch.tensor([
        [0.0, 0, 10, 10],      # gt 0 exactly, right label, kept
        [20, 20, 30, 32],      # gt 1 at IoU 5/6, wrong label fixed by polishing
        [52, 50, 62, 60],      # gt 2 at IoU 2/3, right label broken by polishing
        [100, 100, 110, 110],  # background, dropped
    ])
    raw_labels = torch.tensor([1, 1, 3, 2])
    polished_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [51, 50, 61, 60], [100, 100, 110, 110]])
    keep = torch.tensor([True, True, True, False])
    polished_labels = torch.tensor([1, 2, 1, 2])
    quality.update(_pseudo(raw_boxes, raw_labels, polished_boxes, keep, polished_labels, torch.tensor([0.9, 0.8, 0.7, 0.6])),
                   gt_boxes, gt_labels)
    # A second image where the teacher found nothing of its one object.
    quality.update(_pseudo(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4),
                           torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)),
                   torch.tensor([[5.0, 5, 25, 25]]), torch.tensor([1]))


def _pseudo(raw_boxes, raw_labels, polished_boxes, keep, polished_labels, scores=None) -> PseudoLabels:
    """Pseudo labels of one image (all regression boxes used)."""
    scores = torch.ones(len(raw_boxes)) if scores is None else scores
    return PseudoLabels(raw_boxes, raw_labels, scores, polished_boxes, torch.ones_like(keep), keep, polished_labels)


def test_pseudo_label_quality_on_hand_made_boxes():
    quality = PseudoLabelQuality()
    _two_images(quality)
    expected = {
        "pseudo/images": 2.0,
        "pseudo/num_per_image/raw": 2.0,
        "pseudo/num_per_image/cls": 1.5,
        "pseudo/num_per_image/reg": 2.0,
        "pseudo/keep_ratio": 0.75,
        "pseudo/precision/raw": 2 / 4,  # boxes 0 and 2 match with their raw labels
        "pseudo/recall/raw": 2 / 4,
        "pseudo/precision/cls": 2 / 3,  # boxes 0 and 1 match with their polished labels
        "pseudo/recall/cls": 2 / 4,
        "pseudo/iou_mean/raw": (1 + 5 / 6 + 2 / 3) / 3,
        "pseudo/iou_mean/polished": (1 + 1 + 9 / 11) / 3,
        "pseudo/label_acc/raw": 2 / 3,
        "pseudo/label_acc/polished": 2 / 3,
        "pseudo/relabel/wrong_to_right": 1.0,
        "pseudo/relabel/right_to_wrong": 1.0,
    }
    metrics = quality.compute()
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name


def test_pseudo_label_quality_ratios_without_denominator_are_nan():
    quality = PseudoLabelQuality()
    metrics = quality.compute()
    assert metrics["pseudo/images"] == 0.0 and math.isnan(metrics["pseudo/num_per_image/raw"])
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    quality.update(_pseudo(*empty, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), empty[1]), *empty)
    metrics = quality.compute()
    assert metrics["pseudo/num_per_image/raw"] == 0.0
    for name in ("pseudo/keep_ratio", "pseudo/precision/raw", "pseudo/recall/raw", "pseudo/iou_mean/polished",
                 "pseudo/label_acc/polished"):
        assert math.isnan(metrics[name]), name
    assert math.isnan(metrics["pseudo/relabel/wrong_to_right"])


def test_pseudo_labels_without_hidden_ground_truth_are_counted_not_judged():
    """An unlabeled set that really is unlabeled: a precision of 0 would be a silent wrong
    number (every box a false positive); the quality figures are NaN (not logged), the
    counts stay."""
    quality = PseudoLabelQuality()
    boxes, labels = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]]), torch.tensor([1, 2])
    no_gt = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    quality.update(_pseudo(boxes, labels, boxes, torch.tensor([True, False]), labels), *no_gt)
    metrics = quality.compute()
    assert metrics["pseudo/num_per_image/raw"] == 2.0 and metrics["pseudo/keep_ratio"] == 0.5
    for name in ("pseudo/precision/raw", "pseudo/precision/cls", "pseudo/recall/raw", "pseudo/iou_mean/raw",
                 "pseudo/label_acc/raw", "pseudo/relabel/wrong_to_right", "pseudo/relabel/right_to_wrong"):
        assert math.isnan(metrics[name]), name


def test_pseudo_label_quality_resets_and_checks_lengths():
    quality = PseudoLabelQuality()
    _two_images(quality)
    quality.reset()
    assert quality.compute()["pseudo/images"] == 0.0
    box = torch.tensor([[0.0, 0, 10, 10]])
    with pytest.raises(ValueError):
        quality.update(_pseudo(box, torch.tensor([1]), box, torch.tensor([True, False]), torch.tensor([1]),
                               torch.tensor([0.9])), box, torch.tensor([1]))


def test_polished_iou_is_measured_against_the_raw_boxs_ground_truth():
    # Polishing moved the box onto a different object: that is a bad polish, IoU 0, not 1.
    quality = PseudoLabelQuality()
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    raw = torch.tensor([[0.0, 0, 10, 10]])
    quality.update(_pseudo(raw, torch.tensor([1]), torch.tensor([[20.0, 20, 30, 30]]), torch.tensor([True]),
                           torch.tensor([1])), gt_boxes, torch.tensor([1, 2]))
    metrics = quality.compute()
    assert metrics["pseudo/iou_mean/raw"] == 1.0
    assert metrics["pseudo/iou_mean/polished"] == 0.0


def test_detections_file_round_trips_and_a_corrupt_one_is_named(tmp_path):
    from ssod.evaluation import read_detections, write_detections

    predictions = [{"image_id": 7, "boxes": torch.tensor([[1.0, 2.0, 11.5, 22.25]]), "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([1])}]
    write_detections(tmp_path / "d.json.gz", predictions, {1: 18}, [7, 8])
    image_ids, results = read_detections(tmp_path / "d.json.gz")
    assert image_ids == [7, 8]
    assert results == [{"image_id": 7, "category_id": 18, "bbox": [1.0, 2.0, 10.5, 20.25], "score": 0.5}]
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.json.gz"):
        read_detections(tmp_path / "bad.json.gz")
