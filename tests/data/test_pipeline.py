"""``resolve_files``: which split files a data config trains on, and when they are made anew."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssod.config import compose
from ssod.data.pipeline import resolve_files


def _coco_json(path: Path, count: int) -> Path:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(1, count + 1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}
                   for i in range(1, count + 1)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _labeled_ids(tmp_path: Path, source: Path, *overrides: str) -> list[int]:
    cfg = compose(["data=coco", f"data.train_json={source}", f"data.train_images={tmp_path}", f"data.val_json={source}",
                   f"data.val_images={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "data.percent=10", *overrides])
    files = resolve_files(OmegaConf.to_object(cfg.data), tmp_path)
    return sorted(image["id"] for image in json.loads(Path(files.train_json).read_text())["images"])


def test_another_split_seed_or_reference_offset_gets_its_own_split(tmp_path: Path):
    source = _coco_json(tmp_path / "train.json", 100)
    first = _labeled_ids(tmp_path, source)
    assert len(first) == 10
    assert _labeled_ids(tmp_path, source, "data.split_seed=1") != first
    assert _labeled_ids(tmp_path, source, "data.split_reference_offset=7") not in (first, _labeled_ids(tmp_path, source, "data.split_seed=1"))
    assert _labeled_ids(tmp_path, source) == first  # and each is made once, then reused


def test_a_json_replaced_in_place_gets_new_splits(tmp_path: Path):
    source = _coco_json(tmp_path / "train.json", 100)
    assert max(_labeled_ids(tmp_path, source)) <= 100
    _coco_json(source, 300)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert len(_labeled_ids(tmp_path, source)) == 30


def test_a_missing_training_json_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json: COCO json file not found \(data\.train_json\)"):
        _labeled_ids(tmp_path, tmp_path / "missing.json")


def test_the_strong_views_augmentations_follow_the_data_config(tmp_path: Path, dataset_cache: Path):
    from ssod.data.pipeline import build_data

    cfg = compose([*_small(dataset_cache), "data.strong_photometric=false", "data.strong_erase_count=[0,2]",
                   "data.strong_rotate_deg=5"])
    transform = build_data(OmegaConf.to_object(cfg.data), tmp_path, need_unlabeled=True).unlabeled.view.transform
    assert (transform.photometric, transform.erase_count, transform.max_rotate_deg) == (False, (0, 2), 5.0)
    with pytest.raises(ValueError, match="data.strong_erase_count"):
        build_data(OmegaConf.to_object(compose([*_small(dataset_cache), "data.strong_erase_count=[3,1]"]).data),
                   tmp_path, need_unlabeled=True)


def _small(dataset_cache: Path) -> list[str]:
    return ["data.synthetic.num_train=20", "data.synthetic.num_val=4", f"data.cache_dir={dataset_cache}", "data.percent=50"]


def test_val_max_images_counts_only_the_images_evaluated(tmp_path: Path, dataset_cache: Path):
    from ssod.data.pipeline import build_data

    full = build_data(OmegaConf.to_object(compose(_small(dataset_cache)).data), tmp_path, need_unlabeled=False)
    cut = build_data(OmegaConf.to_object(compose([*_small(dataset_cache), "data.val_max_images=2"]).data), tmp_path,
                     need_unlabeled=False)
    first_two = sum(len(full.val.coco.imgToAnns.get(i, [])) for i in full.val.image_ids[:2])
    assert cut.counts()["data/eval/images"] == 2 and cut.counts()["data/eval/boxes"] == first_two
    assert full.counts()["data/eval/boxes"] > first_two
