"""``ssod-predict``: a checkpoint's COCO-format detections on a COCO json or a folder of images."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssod.data.pipeline import resolve_files
from ssod.predict import main
from ssod.training import run


def _coco_ap(ground_truth: Path, detections: Path) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ground_truth))
        evaluation = COCOeval(truth, truth.loadRes(str(detections)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_detections_on_a_coco_json_score_as_the_training_runs_evaluation(make_config, tmp_path: Path):
    cfg = make_config("train.iterations=2", "model.box_score_thresh=0.0", method="polish_teacher")
    trained = run(cfg)
    files = resolve_files(OmegaConf.to_object(cfg.data), tmp_path)
    out = tmp_path / "detections.json"
    assert main([str(tmp_path / "outputs"), "--json", str(files.val_json), "--images", str(files.val_images),
                 "--out", str(out), "--cpu"]) == 0
    results = json.loads(out.read_text())
    truth = json.loads(files.val_json.read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in truth["images"]}
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in truth["categories"]}
    for r in results:  # xywh in the original image's pixels
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert w >= 0 and h >= 0 and x >= -0.01 and y >= -0.01 and x + w <= width + 0.01 and y + h <= height + 0.01
    # Read by pycocotools as any COCO results file: the AP the training run measured.
    assert _coco_ap(files.val_json, out) == pytest.approx(trained["val/teacher/bbox_AP"], abs=1e-6)


def test_a_folder_gets_numbered_images_pictures_and_its_unreadable_files_skipped(make_config, tmp_path: Path, capsys):
    cfg = make_config("train.iterations=1", "model.box_score_thresh=0.0")
    run(cfg)
    files = resolve_files(OmegaConf.to_object(cfg.data), tmp_path)
    folder = tmp_path / "photos"
    shutil.copytree(files.val_images, folder / "day1")
    (folder / "day1" / "broken.jpg").write_bytes(b"not a picture")
    out, pictures = tmp_path / "out" / "detections.json", tmp_path / "pictures"
    assert main([str(tmp_path / "outputs" / "checkpoints"), "--images", str(folder), "--out", str(out),
                 "--draw", str(pictures), "--draw-score", "0", "--cpu"]) == 0
    images = json.loads(out.with_suffix(".images.json").read_text())["images"]
    names = {image["id"]: image["file_name"] for image in images}
    assert len(names) == 9 and "day1/broken.jpg" in names.values()
    results = json.loads(out.read_text())
    broken = next(i for i, name in names.items() if name.endswith("broken.jpg"))
    assert results and broken not in {r["image_id"] for r in results}
    assert "1 unreadable images skipped" in capsys.readouterr().out
    assert len(list(pictures.glob("day1__*.jpg"))) == 8
    # No image's detections twice (the loader's stand-in for the broken one is its neighbour).
    keys = [(r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"]) for r in results]
    assert len(keys) == len(set(keys))


def test_a_batch_with_two_unreadable_images_counts_them_once_and_duplicates_nothing(make_config, tmp_path: Path,
                                                                                    capsys):
    cfg = make_config("train.iterations=1", "model.box_score_thresh=0.0")
    run(cfg)
    folder = tmp_path / "three"
    folder.mkdir()
    first = next(iter(sorted(resolve_files(OmegaConf.to_object(cfg.data), tmp_path).val_images.glob("*.jpg"))))
    shutil.copy(first, folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"broken")
    (folder / "c.jpg").write_bytes(b"broken too")
    out = tmp_path / "d.json"
    assert main([str(tmp_path / "outputs"), "--images", str(folder), "--out", str(out), "--cpu",
                 "--batch-size", "3"]) == 0
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == {1}
    keys = [(r["category_id"], tuple(r["bbox"]), r["score"]) for r in results]
    assert len(keys) == len(set(keys))
    assert f"{len(results)} detections on 1 images" in capsys.readouterr().out


def test_a_missing_folder_is_one_line(make_config, tmp_path: Path, capsys):
    run(make_config("train.iterations=1"))
    capsys.readouterr()  # the training's own lines
    assert main([str(tmp_path / "outputs"), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssod-predict: error: {tmp_path / 'nowhere'}: not a folder (--images)"]


def test_draw_warns_when_no_box_passes_the_draw_score(make_config, tmp_path: Path, capsys):
    cfg = make_config("train.iterations=1", "model.box_score_thresh=0.0")
    run(cfg)
    files = resolve_files(OmegaConf.to_object(cfg.data), tmp_path)
    capsys.readouterr()
    pictures = tmp_path / "pictures"
    assert main([str(tmp_path / "outputs"), "--json", str(files.val_json), "--images", str(files.val_images),
                 "--out", str(tmp_path / "d.json"), "--draw", str(pictures), "--draw-score", "1.01", "--cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]  # not the progress bar
    assert len(err) == 1 and err[0].startswith("ssod-predict: warning: 8 of 8 pictures show no box: none scored >= 1.01")
    assert "the highest score left out is 0." in err[0]
    assert len(list(pictures.glob("*.jpg"))) == 8
    # With boxes drawn, no warning.
    assert main([str(tmp_path / "outputs"), "--json", str(files.val_json), "--images", str(files.val_images),
                 "--out", str(tmp_path / "d.json"), "--draw", str(pictures), "--draw-score", "0", "--cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
