"""Split files: reproducible, reference-exact, a clean partition that keeps hidden labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssod.data.splits import make_split, percent_tag, select_labeled_indices, split_paths

NUM_IMAGES = 50


def _coco(num_images: int = NUM_IMAGES) -> dict:
    # Ids are shuffled and non-contiguous so a position/id mix-up cannot pass.
    ids = np.random.RandomState(123).permutation(num_images) * 7 + 1000
    images = [
        {"id": int(i), "file_name": f"{int(i)}.jpg", "width": 64, "height": 48} for i in ids
    ]
    annotations = []
    for position, image_id in enumerate(ids.tolist()):
        for _ in range(position % 3):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 3,
                    "bbox": [1.0, 2.0, 10.0, 12.0],
                    "area": 120.0,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "test"},
        "licenses": [{"id": 1, "name": "x"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 3, "name": "car"}],
    }


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps(_coco()))
    return path


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_default_count_is_floor_of_percent_and_at_least_one():
    assert len(select_labeled_indices(100, 1, 29.0)) == 29
    assert len(select_labeled_indices(100, 1, 10.0)) == 10
    assert len(select_labeled_indices(10, 1, 0.5)) == 1
    assert len(select_labeled_indices(7, 1, 100.0)) == 7


def test_default_scheme_is_the_documented_seed_sequence():
    sequence = np.random.SeedSequence([4, 2, 5000])
    draws = np.random.default_rng(sequence).random(40)
    expected = np.sort(np.argsort(draws, kind="stable")[:2])
    selected = select_labeled_indices(40, fold=2, percent=5.0, seed=4)
    np.testing.assert_array_equal(selected, expected)
    assert selected.dtype == np.int64


def test_default_scheme_pinned_values():
    # Pins the split itself: if this changes, published split files stop matching.
    assert select_labeled_indices(100, fold=1, percent=5.0).tolist() == [11, 22, 70, 79, 97]


def test_seed_fold_and_percent_each_change_the_selection():
    base = select_labeled_indices(1000, fold=1, percent=10.0, seed=0)
    assert not np.array_equal(base, select_labeled_indices(1000, fold=2, percent=10.0, seed=0))
    assert not np.array_equal(base, select_labeled_indices(1000, fold=1, percent=10.0, seed=1))
    other_percent = select_labeled_indices(1000, fold=1, percent=10.5, seed=0)
    assert not np.array_equal(base, other_percent[: len(base)])


def test_reference_mode_matches_legacy_global_rng():
    saved = np.random.get_state()
    try:
        for fold, offset, percent, num_images in [(1, 0, 10.0, 97), (3, 7, 1.0, 1000)]:
            np.random.seed(fold + offset)
            count = int(percent / 100.0 * num_images)
            expected = np.random.choice(range(num_images), size=count, replace=False)
            selected = select_labeled_indices(num_images, fold, percent, 0, offset)
            np.testing.assert_array_equal(selected, np.sort(expected))
    finally:
        np.random.set_state(saved)


def test_reference_mode_keeps_the_reference_rounding_quirk():
    # The reference computes int(29 / 100.0 * 100) == 28.
    assert len(select_labeled_indices(100, 1, 29.0, 0, 0)) == 28


def test_reference_mode_leaves_global_rng_alone():
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    select_labeled_indices(500, 1, 10.0, 0, 5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_local_random_state_equals_legacy_global_seed():
    saved = np.random.get_state()
    try:
        np.random.seed(6)
        global_draw = np.random.choice(300, 30, replace=False)
    finally:
        np.random.set_state(saved)
    local_draw = np.random.RandomState(6).choice(range(300), 30, replace=False)
    np.testing.assert_array_equal(global_draw, local_draw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 10, "fold": 1, "percent": 0.0}, "percent"),
        ({"num_images": 10, "fold": 1, "percent": 101.0}, "percent"),
        ({"num_images": 10, "fold": 1, "percent": float("nan")}, "percent"),
        ({"num_images": 0, "fold": 1, "percent": 10.0}, "at least one image"),
        ({"num_images": 10, "fold": -1, "percent": 10.0}, "non-negative"),
        ({"num_images": 5, "fold": 1, "percent": 10.0, "reference_offset": 0}, "0 images"),
        ({"num_images": 50, "fold": 1, "percent": 10.0, "seed": 3, "reference_offset": 0}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_labeled_indices(**kwargs)


def test_names_follow_softteacher_convention(tmp_path: Path):
    assert percent_tag(10.0) == "10"
    assert percent_tag(0.5) == "0.5"
    labeled, unlabeled = split_paths(tmp_path / "instances_train2017.json", tmp_path, 2, 1.0)
    assert labeled.name == "instances_train2017.2@1.json"
    assert unlabeled.name == "instances_train2017.2@1-unlabeled.json"


def test_split_is_a_partition_and_unlabeled_keeps_annotations(coco_json: Path, tmp_path: Path):
    labeled_path, unlabeled_path = make_split(coco_json, tmp_path / "out", fold=1, percent=20.0)
    original, labeled, unlabeled = _load(coco_json), _load(labeled_path), _load(unlabeled_path)
    labeled_ids = {image["id"] for image in labeled["images"]}
    unlabeled_ids = {image["id"] for image in unlabeled["images"]}
    assert len(labeled_ids) == 10
    assert labeled_ids.isdisjoint(unlabeled_ids)
    assert labeled_ids | unlabeled_ids == {image["id"] for image in original["images"]}
    assert all(a["image_id"] in labeled_ids for a in labeled["annotations"])
    assert all(a["image_id"] in unlabeled_ids for a in unlabeled["annotations"])
    assert unlabeled["annotations"], "the unlabeled file must keep its hidden ground truth"
    both = labeled["annotations"] + unlabeled["annotations"]
    assert sorted(both, key=lambda a: a["id"]) == original["annotations"]
    for half in (labeled, unlabeled):
        assert half["categories"] == original["categories"]
        assert {k: v for k, v in half["info"].items() if k != "ssod_split"} == original["info"]  # kept, plus the record
        assert half["licenses"] == original["licenses"]


def test_same_inputs_give_byte_identical_files(coco_json: Path, tmp_path: Path):
    first = make_split(coco_json, tmp_path / "a", fold=3, percent=10.0, seed=5)
    second = make_split(coco_json, tmp_path / "b", fold=3, percent=10.0, seed=5)
    for path_a, path_b in zip(first, second):
        assert path_a.read_bytes() == path_b.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in first)


def test_different_fold_gives_different_labeled_images(coco_json: Path, tmp_path: Path):
    fold1, _ = make_split(coco_json, tmp_path, fold=1, percent=20.0)
    fold2, _ = make_split(coco_json, tmp_path, fold=2, percent=20.0)
    ids1 = {image["id"] for image in _load(fold1)["images"]}
    ids2 = {image["id"] for image in _load(fold2)["images"]}
    assert len(ids1) == len(ids2) == 10
    assert ids1 != ids2


def test_reference_mode_selects_by_position_in_json_order(coco_json: Path, tmp_path: Path):
    labeled_path, _ = make_split(coco_json, tmp_path, fold=1, percent=10.0, reference_offset=4)
    saved = np.random.get_state()
    try:
        np.random.seed(1 + 4)
        positions = np.random.choice(range(NUM_IMAGES), size=5, replace=False)
    finally:
        np.random.set_state(saved)
    images = _load(coco_json)["images"]
    expected = [images[i]["id"] for i in sorted(positions.tolist())]
    assert [image["id"] for image in _load(labeled_path)["images"]] == expected


def test_annotation_with_unknown_image_id_is_an_error(tmp_path: Path):
    data = _coco()
    data["annotations"][0]["image_id"] = 424242
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"broken\.json.*unknown image id 424242"):
        make_split(path, tmp_path / "out", fold=1, percent=10.0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_duplicate_image_id_is_an_error(tmp_path: Path):
    data = _coco()
    data["images"][1]["id"] = data["images"][0]["id"]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dup\.json.*duplicate image id"):
        make_split(path, tmp_path, fold=1, percent=10.0)


def test_malformed_and_missing_json_name_the_file(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad\.json: malformed json"):
        make_split(path, tmp_path, fold=1, percent=10.0)
    with pytest.raises(FileNotFoundError, match=r"absent\.json"):
        make_split(tmp_path / "absent.json", tmp_path, fold=1, percent=10.0)
