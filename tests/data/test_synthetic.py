import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssod.data import synthetic
from ssod.data.cache import default_cache_dir
from ssod.data.synthetic import CLASS_NAMES, SyntheticRecipe, ensure_synthetic

TINY = SyntheticRecipe(seed=3, num_train=14, num_val=6)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_recipe_gives_identical_files(tmp_path):
    first = ensure_synthetic(tmp_path / "a", TINY)
    second = ensure_synthetic(tmp_path / "b", TINY)
    assert first.root.name == second.root.name
    first_files, second_files = _files(first.root), _files(second.root)
    assert len(first_files) == TINY.num_train + TINY.num_val + 3  # two json and recipe.json
    assert first_files == second_files


def test_different_seed_gives_different_data(tmp_path):
    first = ensure_synthetic(tmp_path, TINY)
    other = ensure_synthetic(tmp_path, SyntheticRecipe(seed=4, num_train=14, num_val=6))
    assert first.root != other.root
    assert first.train_json.read_bytes() != other.train_json.read_bytes()
    first_image = (first.train_images / "000001.jpg").read_bytes()
    assert first_image != (other.train_images / "000001.jpg").read_bytes()


def test_fingerprint_follows_recipe_not_spelling():
    assert TINY.fingerprint() != SyntheticRecipe(seed=3, num_train=15, num_val=6).fingerprint()
    spelled_as_yaml = SyntheticRecipe(seed=3, num_train=14, num_val=6, image_size=[128, 192],
                                      object_size=[10, 60])
    assert spelled_as_yaml.fingerprint() == TINY.fingerprint()
    assert spelled_as_yaml == TINY


@pytest.mark.parametrize("bad", [
    {"num_classes": 0}, {"num_classes": len(CLASS_NAMES) + 1}, {"objects_per_image": (3, 2)},
    {"object_size": (10, 300)}, {"max_aspect": 0.5},
])
def test_invalid_recipe_is_rejected(bad):
    with pytest.raises(ValueError):
        SyntheticRecipe(**bad)


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_loads_in_pycocotools_with_boxes_inside_images(tmp_path, split):
    paths = ensure_synthetic(tmp_path, TINY)
    json_path, image_dir = {"train": (paths.train_json, paths.train_images),
                            "val": (paths.val_json, paths.val_images)}[split]
    coco = COCO(str(json_path))
    expected_images = TINY.num_train if split == "train" else TINY.num_val
    assert len(coco.getImgIds()) == expected_images
    categories = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in categories] == list(enumerate(CLASS_NAMES, start=1))
    low, high = TINY.image_size
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(image_dir / image["file_name"]) as picture:
            assert picture.size == (image["width"], image["height"])
        assert low <= image["width"] <= high and low <= image["height"] <= high
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert TINY.objects_per_image[0] <= len(annotations) <= TINY.objects_per_image[1]
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
            side = (w * h) ** 0.5
            assert TINY.object_size[0] * 0.99 <= side <= TINY.object_size[1] * 1.01
            assert 0 < annotation["area"] <= w * h
            assert annotation["iscrowd"] == 0
            assert 1 <= annotation["category_id"] <= TINY.num_classes


def test_objects_are_painted_inside_their_boxes(tmp_path):
    # Without noise and clutter, an object must change pixels inside its box; it
    # cannot paint anywhere else, so inside-box change dominates.
    recipe = SyntheticRecipe(seed=1, num_train=6, num_val=1, noise_std=0.0, clutter_per_image=(0, 0))
    paths = ensure_synthetic(tmp_path, recipe)
    dataset = json.loads(paths.train_json.read_text())
    for index, image in enumerate(dataset["images"]):
        rng = np.random.default_rng([recipe.seed, 0, image["id"]])
        width, height = (int(v) for v in rng.integers(*recipe.image_size, endpoint=True, size=2))
        background = np.asarray(synthetic._background(rng, width, height), dtype=np.float32)
        picture = np.asarray(Image.open(paths.train_images / image["file_name"]), dtype=np.float32)
        changed = np.abs(picture - background).max(axis=2) > 40
        inside = np.zeros_like(changed)
        for annotation in dataset["annotations"]:
            if annotation["image_id"] == image["id"]:
                x, y, w, h = annotation["bbox"]
                region = changed[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))]
                assert region.mean() > 0.1
                inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        assert changed[~inside].mean() < 0.01


def test_fewer_classes_use_the_first_names(tmp_path):
    paths = ensure_synthetic(tmp_path, SyntheticRecipe(num_train=10, num_val=2, num_classes=3))
    dataset = json.loads(paths.train_json.read_text())
    assert [c["name"] for c in dataset["categories"]] == list(CLASS_NAMES[:3])
    assert {a["category_id"] for a in dataset["annotations"]} <= {1, 2, 3}


def test_second_call_reuses_the_cache(tmp_path):
    paths = ensure_synthetic(tmp_path, TINY)
    stamp = paths.train_json.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, TINY) == paths
    assert paths.train_json.stat().st_mtime_ns == stamp


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    build = synthetic._build_dataset
    target = tmp_path / f"synthetic-{TINY.fingerprint()}"

    def build_then_lose(root, recipe):
        build(root, recipe)
        build(target, recipe)  # another process finishes first
        (target / "winner").touch()

    monkeypatch.setattr(synthetic, "_build_dataset", build_then_lose)
    paths = ensure_synthetic(tmp_path, TINY)
    assert paths.root == target
    assert (target / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_two_processes_at_once_leave_one_directory(tmp_path):
    script = textwrap.dedent(f"""
        from ssod.data.synthetic import SyntheticRecipe, ensure_synthetic
        print(ensure_synthetic({str(tmp_path)!r}, SyntheticRecipe(seed=3, num_train=30, num_val=6)).root)
    """)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    roots = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert roots[0] == roots[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(roots[0]).name]
    coco = COCO(str(Path(roots[0]) / "annotations" / "train.json"))
    assert len(coco.getImgIds()) == 30


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SSOD_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SSOD_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "ssod"


def test_a_test_split_is_drawn_apart_and_leaves_the_other_files_and_name_unchanged(tmp_path):
    with_test = SyntheticRecipe(seed=3, num_train=14, num_val=6, num_test=5)
    assert with_test.fingerprint() != TINY.fingerprint()
    # No test split: the name (and the files) of a dataset made before test splits existed.
    assert SyntheticRecipe(seed=3, num_train=14, num_val=6, num_test=0).fingerprint() == TINY.fingerprint()
    plain, tested = ensure_synthetic(tmp_path / "a", TINY), ensure_synthetic(tmp_path / "b", with_test)
    assert not plain.test_json.exists()
    assert len(json.loads(tested.test_json.read_text())["images"]) == 5
    for split in ("train", "val"):
        assert (plain.root / split / "000001.jpg").read_bytes() == (tested.root / split / "000001.jpg").read_bytes()
    # Its own random streams: test image 1 is neither train nor val image 1.
    test_image = (tested.test_images / "000001.jpg").read_bytes()
    assert test_image not in ((tested.train_images / "000001.jpg").read_bytes(), (tested.val_images / "000001.jpg").read_bytes())
