"""The pasted testbed on the real COCO sample (../shared/data/coco128): deterministic, pools
disjoint, boxes tight on the visible masks, classes long-tailed, distractors never labeled."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssod.config import compose
from ssod.data.check import check_dataset
from ssod.data.cli import main as data_cli
from ssod.data.coco import DatasetError
from ssod.data.instances import decode_mask, pool_of
from ssod.data.pasted import PastedRecipe, ensure_pasted
from ssod.data.pipeline import resolve_files

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COCO128 = PROJECT_ROOT.parent / "shared" / "data" / "coco128"
SOURCE_JSON = COCO128 / "annotations" / "instances_train2017.json"
SOURCE_IMAGES = COCO128 / "train2017"
TINY = PastedRecipe(seed=1, num_train=24, num_open=8, num_val=8, num_test=6)
SPLITS = ("train", "open", "val", "test")

needs_coco128 = pytest.mark.skipif(
    not (SOURCE_JSON.is_file() and SOURCE_IMAGES.is_dir()),
    reason=f"coco128 is not at {COCO128} (the shared real-data fixture beside the project)",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (SOURCE_JSON.is_file() and SOURCE_IMAGES.is_dir()):
        pytest.skip(f"coco128 is not at {COCO128} (the shared real-data fixture beside the project)")
    return ensure_pasted(tmp_path_factory.mktemp("pasted"), SOURCE_JSON, SOURCE_IMAGES, TINY)


def _read(paths, split: str) -> dict:
    return json.loads((paths.root / "annotations" / f"{split}.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_coco128
def test_the_same_recipe_gives_identical_files_and_another_seed_other_images(built, tmp_path):
    again = ensure_pasted(tmp_path / "again", SOURCE_JSON, SOURCE_IMAGES, TINY)
    assert again.root.name == built.root.name
    assert _files(again.root) == _files(built.root)
    other = ensure_pasted(tmp_path / "other", SOURCE_JSON, SOURCE_IMAGES, PastedRecipe(seed=2, num_train=4, num_open=1,
                                                                                       num_val=2))
    assert other.root.name != built.root.name
    assert (other.root / "train/000001.jpg").read_bytes() != (built.root / "train/000001.jpg").read_bytes()
    assert _read(other, "train")["categories"] == _read(built, "train")["categories"]  # the pools ignore the seed


@needs_coco128
def test_validation_and_test_share_no_source_image_with_training(built):
    source = json.loads(SOURCE_JSON.read_text())
    file_names = {image["id"]: image["file_name"] for image in source["images"]}
    used = {}
    for split in SPLITS:
        data = _read(built, split)
        used[split] = {a["source_image_id"] for a in data["annotations"]}
        used[split] |= {image["source_background_id"] for image in data["images"]}
        used[split] |= {next(a["image_id"] for a in source["annotations"] if a["id"] == d["source_annotation_id"])
                        for image in data["images"] for d in image.get("distractors", [])}
    training, held_out = used["train"] | used["open"], used["val"] | used["test"]
    assert training and held_out and training.isdisjoint(held_out)
    assert {pool_of(file_names[i], TINY.eval_fraction) for i in training} == {"train"}
    assert {pool_of(file_names[i], TINY.eval_fraction) for i in held_out} == {"eval"}
    # No photograph whose license forbids derivatives (coco128: licenses 3 and 6, 40 images) is cut or cropped.
    no_derivatives = {entry["id"] for entry in source["licenses"] if "NoDerivs" in entry["name"]}
    licenses = {image["id"]: image["license"] for image in source["images"]}
    assert no_derivatives == {3, 6} and not {licenses[i] for i in training | held_out} & no_derivatives
    assert json.loads((built.root / "source.json").read_text())["skipped_instances"]["no_derivatives_images"] == 40


@needs_coco128
def test_boxes_are_tight_on_the_visible_masks_inside_the_images(built):
    boxes = 0
    for split in SPLITS:
        data = _read(built, split)
        sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
        for annotation in data["annotations"]:
            visible = decode_mask(annotation["segmentation"], *sizes[annotation["image_id"]])
            assert visible.shape == sizes[annotation["image_id"]]
            rows, columns = np.nonzero(visible)
            x, y, width, height = annotation["bbox"]
            assert (x, y, x + width, y + height) == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
            assert annotation["area"] == visible.sum() > 0
            boxes += 1
    assert boxes > 50


@needs_coco128
def test_objects_are_real_pixels_that_differ_from_the_bare_background(built):
    """A box holds the pasted instance: its visible pixels are not uniform (a photograph's,
    not a flat fill), and the json's image size is the file's."""
    data = _read(built, "val")
    annotation = max(data["annotations"], key=lambda a: a["area"])
    image = next(i for i in data["images"] if i["id"] == annotation["image_id"])
    with Image.open(built.images("val") / image["file_name"]) as opened:
        assert opened.size == (image["width"], image["height"])
        pixels = np.asarray(opened, dtype=np.float32)
    visible = decode_mask(annotation["segmentation"], image["height"], image["width"])
    assert pixels[visible].std(axis=0).mean() > 10


@needs_coco128
def test_classes_are_long_tailed_most_frequent_first(built):
    counts = Counter()
    for split in SPLITS:
        counts.update(a["category_id"] for a in _read(built, split)["annotations"])
    categories = _read(built, "train")["categories"]
    assert [c["id"] for c in categories] == list(range(1, TINY.num_classes + 1))
    assert categories[0]["name"] == "person"  # coco128's most frequent class
    head, tail = counts[1], counts[TINY.num_classes]
    assert head >= 4 * max(tail, 1)
    assert sum(counts[k] for k in (1, 2)) > sum(counts[k] for k in range(3, TINY.num_classes + 1)) / 2


@needs_coco128
def test_distractors_appear_only_in_open_images_and_are_never_labeled(built):
    names = {c["name"] for c in _read(built, "train")["categories"]}
    open_images = _read(built, "open")["images"]
    distractors = [d for image in open_images for d in image["distractors"]]
    assert sum(1 for image in open_images if image["distractors"]) >= len(open_images) - 1
    assert distractors and not names & {d["name"] for d in distractors}
    for split in ("train", "val", "test"):
        assert all("distractors" not in image for image in _read(built, split)["images"])


@needs_coco128
def test_open_images_join_the_unlabeled_split_and_never_the_labeled_one(tmp_path):
    cfg = compose(["data=pasted", f"data.cache_dir={tmp_path}", "data.percent=50",
                   f"data.pasted.source_json={SOURCE_JSON}", f"data.pasted.source_images={SOURCE_IMAGES}",
                   "data.pasted.num_train=6", "data.pasted.num_open=3", "data.pasted.num_val=2"])
    files = resolve_files(cfg.data, PROJECT_ROOT)
    labeled, unlabeled = (json.loads(path.read_text()) for path in (files.train_json, files.unlabeled_json))
    assert sorted(i["id"] for i in labeled["images"] + unlabeled["images"]) == list(range(1, 10))
    assert {7, 8, 9} <= {i["id"] for i in unlabeled["images"]}
    assert not any("distractors" in image for image in labeled["images"])
    annotation_ids = [a["id"] for a in labeled["annotations"] + unlabeled["annotations"]]
    assert len(annotation_ids) == len(set(annotation_ids))


@needs_coco128
def test_ssod_data_check_passes_on_every_split(built, capsys):
    for split in SPLITS:
        report = check_dataset(built.root / "annotations" / f"{split}.json", built.images(split))
        assert report.ok and not report.warnings, report.errors + report.warnings
    assert data_cli(["check", str(built.val_json), str(built.images("val"))]) == 0
    assert "result: OK" in capsys.readouterr().out


def test_a_missing_source_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "instances.json"
    cfg = compose(["data=pasted", f"data.cache_dir={tmp_path / 'cache'}", f"data.pasted.source_json={missing}"])
    with pytest.raises(DatasetError) as raised:
        resolve_files(cfg.data, PROJECT_ROOT)
    assert str(missing) in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()


def test_the_default_source_is_coco128_beside_the_project():
    pasted = compose(["data=pasted"]).data.pasted
    assert (PROJECT_ROOT / pasted.source_json).resolve() == SOURCE_JSON.resolve()
    assert (PROJECT_ROOT / pasted.source_images).resolve() == SOURCE_IMAGES.resolve()


@pytest.mark.parametrize("bad", [{"num_train": 0}, {"min_visible": 0.0}, {"object_size": (30, 20)},
                                 {"eval_fraction": 1.0}])
def test_invalid_recipe_is_rejected(bad):
    with pytest.raises(ValueError):
        PastedRecipe(**bad)
