"""Real COCO data (../shared/data/coco128): category map, a 10% split, 2 iterations and an evaluation.

The data stays where it is: the split files go to the test's tmp cache, nothing is copied
into the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssod.data.coco import CategoryMap, annotations_to_target, load_coco
from ssod.data.splits import make_split
from ssod.evaluation import coco_evaluate
from ssod.training import run

COCO128 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128"
ANNOTATIONS = COCO128 / "annotations" / "instances_train2017.json"
IMAGES = COCO128 / "train2017"
# COCO 2017's 80 category ids: 1..90 without these ten.
UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}

pytestmark = pytest.mark.skipif(
    not (ANNOTATIONS.is_file() and IMAGES.is_dir()),
    reason=f"coco128 is not at {COCO128} (the shared real-data fixture beside the project)",
)


def test_the_category_map_has_coco_ids_and_round_trips():
    coco = load_coco(ANNOTATIONS)
    category_map = CategoryMap.from_coco(coco)
    assert category_map.num_classes == 80
    assert set(category_map.category_ids) == set(range(1, 91)) - UNUSED_IDS
    assert list(category_map.label_to_category_id) == list(range(1, 81))
    assert category_map.label_to_category_id[1] == 1 and category_map.label_to_category_id[80] == 90
    assert category_map.names[0] == "person" and category_map.names[-1] == "toothbrush"
    for label, category_id in category_map.label_to_category_id.items():
        assert category_map.category_id_to_label[category_id] == label


def test_targets_drop_crowd_boxes_and_perfect_predictions_score_one():
    """Ground truth turned into predictions and mapped back to COCO ids gives AP 1.0:
    a 0-based label or a wrong id would give a silent AP of 0."""
    coco = load_coco(ANNOTATIONS)
    category_map = CategoryMap.from_coco(coco)
    predictions, crowd, kept, dropped = [], 0, 0, 0
    for image_id, info in coco.imgs.items():
        anns = coco.imgToAnns.get(image_id, [])
        target, degenerate = annotations_to_target(anns, category_map, info["width"], info["height"])
        crowd += sum(1 for a in anns if a.get("iscrowd", 0))
        kept += len(target["labels"])
        dropped += degenerate
        scores = target["labels"].float().new_ones(len(target["labels"]))
        predictions.append({"image_id": image_id, **target, "scores": scores})
    assert crowd > 0 and kept + crowd + dropped == len(coco.dataset["annotations"])
    assert sum(1 for image_id in coco.imgs if not coco.imgToAnns.get(image_id)) == 2  # images without boxes
    metrics = coco_evaluate(coco, predictions, category_map.label_to_category_id, per_class=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_a_ten_percent_split_keeps_the_hidden_ground_truth(tmp_path: Path):
    labeled_path, unlabeled_path = make_split(ANNOTATIONS, tmp_path, fold=1, percent=10.0, seed=0)
    labeled, unlabeled = json.loads(labeled_path.read_text()), json.loads(unlabeled_path.read_text())
    assert (len(labeled["images"]), len(unlabeled["images"])) == (12, 116)
    labeled_ids = {image["id"] for image in labeled["images"]}
    assert labeled_ids.isdisjoint(image["id"] for image in unlabeled["images"])
    assert len(labeled["annotations"]) + len(unlabeled["annotations"]) == 939
    assert labeled["categories"] == unlabeled["categories"] == json.loads(ANNOTATIONS.read_text())["categories"]


@pytest.mark.slow
def test_two_iterations_and_an_evaluation_on_real_data(make_config, mlflow_store, tmp_path: Path):
    cache = tmp_path / "cache"
    metrics = run(make_config(
        "data=coco128",
        f"data.train_json={ANNOTATIONS}", f"data.train_images={IMAGES}",
        f"data.val_json={ANNOTATIONS}", f"data.val_images={IMAGES}",
        f"data.cache_dir={cache}", "data.val_max_images=8",
        "train.iterations=2",
        method="polish_teacher",
    ))
    split_files = sorted(path.name for path in cache.rglob("*.json"))
    assert split_files == ["instances_train2017.1@10-unlabeled.json", "instances_train2017.1@10.json"]
    run_ = mlflow_store.only_run()
    assert run_.info.status == "FINISHED"
    for key in ("val/teacher/bbox_AP", "val/student/bbox_AP"):
        assert 0.0 <= metrics[key] <= 1.0 and mlflow_store.steps(run_.info.run_id, key) == [2]
    assert "val/teacher/bbox_AP/person" in run_.data.metrics  # per-class AP under COCO's names
    assert mlflow_store.steps(run_.info.run_id, "train/loss") == [1, 2]
    contexts = {tag.value: entry.dataset.name for entry in run_.inputs.dataset_inputs for tag in entry.tags
                if tag.key == "mlflow.data.context"}
    assert contexts == {"train": "coco128/instances_train2017.1@10.json",
                        "unlabeled": "coco128/instances_train2017.1@10-unlabeled.json",
                        "eval": "coco128/instances_train2017.json"}
