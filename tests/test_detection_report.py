"""The evaluation report: per-class AP table in %, confusion matrix counts, pictures."""

from __future__ import annotations

import numpy as np
import pytest

from ssod.evaluation import coco_from_dataset
from ssod.report import build_report, confusion_matrix, write_report


def _ground_truth():
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [50, 50, 45, 45], "area": 2025, "iscrowd": 1},
    ]
    categories = [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]
    return coco_from_dataset({"images": images, "annotations": annotations, "categories": categories})


RESULTS = [
    {"image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 30], "score": 0.9},  # the cat: right
    {"image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "score": 0.8},  # the dog, called a cat
    {"image_id": 2, "category_id": 9, "bbox": [70, 5, 20, 20], "score": 0.7},  # nothing there
    {"image_id": 2, "category_id": 7, "bbox": [50, 50, 45, 45], "score": 0.95},  # on the crowd: not counted
    {"image_id": 2, "category_id": 9, "bbox": [5, 5, 40, 40], "score": 0.3},  # the dog, below the score
]


def test_confusion_matrix_counts_pairs_leftovers_and_misses():
    matrix = confusion_matrix(_ground_truth(), RESULTS, [1, 2], [7, 9], score_threshold=0.5)
    # rows predicted (cat, dog, background), columns true (cat, dog, background)
    assert matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    low = confusion_matrix(_ground_truth(), RESULTS, [1, 2], [7, 9], score_threshold=0.2)
    assert low[1, 1] == 1 and low[2, 1] == 0  # the low-scored dog now found
    assert confusion_matrix(_ground_truth(), RESULTS, [1], [7, 9], score_threshold=0.5).sum() == 2


def test_table_gives_ap_in_percent_per_class_and_overall():
    perfect = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 30], "score": 0.9}]
    report = build_report(_ground_truth(), perfect, [1, 2])
    rows = {row["class"]: row for row in report.rows}
    assert rows["cat"]["AP"] == pytest.approx(1.0) and rows["dog"]["AP"] == 0.0
    assert (rows["cat"]["objects"], rows["dog"]["objects"], rows["all"]["objects"]) == (1, 2, 3)  # crowd left out
    assert rows["all"]["AP"] == pytest.approx(0.5) and rows["all"]["detections"] == 1
    lines = report.table().splitlines()
    assert lines[0].split() == ["class", "objects", "detections", "AP", "AP50", "AP75", "AR100"]
    assert lines[1].split() == ["cat", "1", "1", "100.0", "100.0", "100.0", "100.0"]
    assert lines[2].split() == ["dog", "2", "0", "0.0", "0.0", "0.0", "0.0"]
    assert lines[3].split()[:4] == ["all", "3", "1", "50.0"]
    # A class without ground truth in the evaluated images: "-", not 0.
    only_first = build_report(_ground_truth(), perfect, [1])
    assert "-" not in only_first.table().splitlines()[1]
    none_of = build_report(_ground_truth(), [], [2])
    assert none_of.table().splitlines()[1].split()[3:] == ["-", "-", "-", "-"]


def test_pictures_are_written(tmp_path):
    from PIL import Image

    report = build_report(_ground_truth(), RESULTS, [1, 2])
    files = write_report(report, tmp_path / "report")
    assert [f.name for f in files] == ["per_class_ap.txt", "pr_curves.png", "confusion_matrix.png"]
    for file in files[1:]:
        with Image.open(file) as picture:
            width, height = picture.size
            assert width >= 500 and height >= 400
            # Not a blank canvas: the curves and cells are drawn.
            assert len(np.unique(np.asarray(picture.convert("L")))) > 10
