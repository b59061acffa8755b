"""`ssod-data` subcommands: split, voc2coco, check; exit statuses and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ssod.data.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_coco(tmp_path: Path, modes: list[str]) -> Path:
    """One 16x12 image per entry of ``modes`` under tmp_path/images, one box each."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images, annotations = [], []
    for index, mode in enumerate(modes, start=1):
        name = f"{index}.png"
        Image.new(mode, (16, 12)).save(image_dir / name)
        images.append({"id": index, "file_name": name, "width": 16, "height": 12})
        annotations.append(
            {"id": index, "image_id": index, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16}
        )
    path = tmp_path / "instances_train2017.json"
    categories = [{"id": 1, "name": "thing"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def test_split_writes_every_fold_and_percent(tmp_path: Path, capsys):
    coco_json = _write_coco(tmp_path, ["RGB"] * 20)
    status = main(["split", str(coco_json), "--percent", "10", "50", "--fold", "1", "2"])
    assert status == 0
    out_dir = tmp_path / "semi_supervised" / "seed-0"
    names = sorted(path.name for path in out_dir.iterdir())
    assert names == sorted(
        f"instances_train2017.{fold}@{percent}{suffix}.json"
        for fold in (1, 2)
        for percent in (10, 50)
        for suffix in ("", "-unlabeled")
    )
    labeled = json.loads((out_dir / "instances_train2017.2@50.json").read_text())
    assert len(labeled["images"]) == 10
    assert "fold 2 @ 50%" in capsys.readouterr().out


def test_split_reference_offset_and_out_dir(tmp_path: Path):
    coco_json = _write_coco(tmp_path, ["RGB"] * 20)
    argv = ["split", str(coco_json), "--percent", "25", "--fold", "3", "--reference-offset", "2"]
    assert main(argv + ["--out-dir", str(tmp_path / "ref")]) == 0
    labeled = json.loads((tmp_path / "ref" / "instances_train2017.3@25.json").read_text())
    assert len(labeled["images"]) == 5


def test_split_rejects_seed_with_reference_offset(tmp_path: Path, capsys):
    coco_json = _write_coco(tmp_path, ["RGB"] * 4)
    argv = ["split", str(coco_json), "--percent", "50", "--fold", "1"]
    assert main(argv + ["--reference-offset", "0", "--seed", "3"]) == 1
    assert "--seed is not used" in capsys.readouterr().err


def test_split_of_missing_json_fails_naming_it(tmp_path: Path, capsys):
    status = main(["split", str(tmp_path / "gone.json"), "--percent", "10", "--fold", "1"])
    assert status == 1
    assert "gone.json: COCO json file not found" in capsys.readouterr().err


def test_voc2coco_converts_and_result_checks_clean(tmp_path: Path, capsys):
    year_dir = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year_dir / folder).mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(year_dir / "JPEGImages" / "000001.jpg")
    (year_dir / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>20</width><height>10</height></size><object><name>dog</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>"
        "</annotation>"
    )
    (year_dir / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    out = tmp_path / "voc.json"
    argv = ["voc2coco", str(tmp_path / "VOCdevkit"), "--sets", "2007:trainval"]
    assert main(argv + ["--out", str(out)]) == 0
    assert "1 images (2007:trainval: 1), 1 annotations (0 difficult)" in capsys.readouterr().out
    assert main(["check", str(out), str(tmp_path / "VOCdevkit")]) == 0
    assert "errors (0):" in capsys.readouterr().out


def test_voc2coco_bad_set_syntax_is_a_usage_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["voc2coco", str(tmp_path), "--sets", "2007-trainval", "--out", "o.json"])
    assert raised.value.code == 2
    assert "expected YEAR:SPLIT" in capsys.readouterr().err


def test_voc2coco_missing_tree_fails_with_message(tmp_path: Path, capsys):
    out = str(tmp_path / "o.json")
    status = main(["voc2coco", str(tmp_path), "--sets", "2007:trainval", "--out", out])
    assert status == 1
    assert "trainval.txt: split file not found" in capsys.readouterr().err


def test_check_exit_status_zero_with_only_warnings(tmp_path: Path, capsys):
    coco_json = _write_coco(tmp_path, ["RGB", "RGBA"])
    assert main(["check", str(coco_json), str(tmp_path / "images")]) == 0
    out = capsys.readouterr().out
    assert "warnings (1):" in out and "image mode RGBA" in out
    assert out.rstrip().endswith("result: OK")


def test_check_exit_status_one_on_errors(tmp_path: Path, capsys):
    coco_json = _write_coco(tmp_path, ["RGB", "RGB"])
    (tmp_path / "images" / "2.png").unlink()
    assert main(["check", str(coco_json), str(tmp_path / "images")]) == 1
    out = capsys.readouterr().out
    assert "missing image file" in out and out.rstrip().endswith("result: FAILED")
    assert main(["check", str(coco_json), str(tmp_path / "images"), "--no-images"]) == 0


def test_runs_as_python_module(tmp_path: Path):
    coco_json = _write_coco(tmp_path, ["RGB"])
    result = subprocess.run(
        [sys.executable, "-m", "ssod.data.cli", "check", str(coco_json), str(tmp_path / "images")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "result: OK" in result.stdout


def test_a_split_records_how_it_was_made_and_another_seed_gets_its_own_folder(tmp_path: Path, capsys):
    coco_json = _write_coco(tmp_path, ["RGB"] * 20)
    argv = ["split", str(coco_json), "--percent", "10", "--fold", "1"]
    assert main(argv) == 0 and main(argv + ["--seed", "7"]) == 0 and main(argv + ["--reference-offset", "2"]) == 0
    out = capsys.readouterr().out
    assert "selection: seed 7" in out and "np.random.seed(fold + 2)" in out
    files = {scheme: tmp_path / "semi_supervised" / scheme / "instances_train2017.1@10.json"
             for scheme in ("seed-0", "seed-7", "reference-2")}
    info = {scheme: json.loads(path.read_text())["info"]["ssod_split"] for scheme, path in files.items()}
    assert info["seed-0"] == {"source": "instances_train2017.json", "fold": 1, "percent": 10.0, "labeled_images": 2,
                              "mode": "seed", "seed": 0, "reference_offset": None, "role": "labeled"}
    assert info["seed-7"]["seed"] == 7 and info["reference-2"]["mode"] == "reference"
    assert info["reference-2"]["reference_offset"] == 2 and info["reference-2"]["seed"] is None
    unlabeled = tmp_path / "semi_supervised" / "seed-7" / "instances_train2017.1@10-unlabeled.json"
    assert json.loads(unlabeled.read_text())["info"]["ssod_split"]["role"] == "unlabeled"
