"""VOC xml -> COCO json: class ids, box convention, difficult flag, ids across years."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssod.data.voc import VOC_CLASSES, parse_voc_xml, voc_to_coco


def _object_xml(name: str, box: tuple, difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _image_xml(stem: str, width: int, height: int, objects: list[str]) -> str:
    return (
        f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        + "".join(objects)
        + "</annotation>"
    )


def _add_image(root: Path, year: str, stem: str, xml: str, size=(40, 30)) -> None:
    year_dir = root / f"VOC{year}"
    (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    (year_dir / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (year_dir / "Annotations" / f"{stem}.xml").write_text(xml)
    Image.new("RGB", size, (120, 60, 30)).save(year_dir / "JPEGImages" / f"{stem}.jpg")


def _write_split(root: Path, year: str, split: str, stems: list[str]) -> None:
    main = root / f"VOC{year}" / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("\n".join(stems) + "\n")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    _add_image(
        root,
        "2007",
        "000005",
        _image_xml("000005", 40, 30, [_object_xml("chair", (1, 1, 40, 30))]),
    )
    _add_image(
        root,
        "2007",
        "000007",
        _image_xml(
            "000007",
            40,
            30,
            [_object_xml("car", (5, 6, 14, 26)), _object_xml("person", (2, 3, 2, 3), 1)],
        ),
    )
    _add_image(
        root,
        "2012",
        "2008_000008",
        _image_xml("2008_000008", 40, 30, [_object_xml("horse", (10.5, 4, 20.5, 9))]),
    )
    _write_split(root, "2007", "trainval", ["000005", "000007"])
    _write_split(root, "2012", "trainval", ["2008_000008"])
    return root


def test_categories_are_the_twenty_voc_classes_in_standard_order(voc_root, tmp_path):
    voc_to_coco(voc_root, [("2007", "trainval")], tmp_path / "out.json")
    categories = json.loads((tmp_path / "out.json").read_text())["categories"]
    assert [c["id"] for c in categories] == list(range(1, 21))
    assert [c["name"] for c in categories] == list(VOC_CLASSES)
    assert categories[0]["name"] == "aeroplane" and categories[14]["name"] == "person"
    assert categories[19]["name"] == "tvmonitor"


def test_box_convention_one_based_inclusive_to_xywh(voc_root, tmp_path):
    voc_to_coco(voc_root, [("2007", "trainval"), ("2012", "trainval")], tmp_path / "out.json")
    annotations = json.loads((tmp_path / "out.json").read_text())["annotations"]
    by_category = {a["category_id"]: a for a in annotations}
    full_image = by_category[VOC_CLASSES.index("chair") + 1]
    assert full_image["bbox"] == [0, 0, 40, 30]
    assert full_image["area"] == 1200
    car = by_category[VOC_CLASSES.index("car") + 1]
    assert car["bbox"] == [4, 5, 10, 21]
    single_pixel = by_category[VOC_CLASSES.index("person") + 1]
    assert single_pixel["bbox"] == [1, 2, 1, 1]
    horse = by_category[VOC_CLASSES.index("horse") + 1]
    assert horse["bbox"] == [9.5, 3, 11, 6]


def test_difficult_kept_not_crowd_but_flagged(voc_root, tmp_path):
    summary = voc_to_coco(voc_root, [("2007", "trainval")], tmp_path / "out.json")
    annotations = json.loads((tmp_path / "out.json").read_text())["annotations"]
    assert summary["difficult"] == 1
    assert [a["difficult"] for a in annotations] == [0, 0, 1]
    assert all(a["iscrowd"] == 0 for a in annotations)


def test_years_combine_with_unique_ids_and_devkit_relative_names(voc_root, tmp_path):
    out = tmp_path / "voc0712.json"
    summary = voc_to_coco(voc_root, [("2007", "trainval"), ("2012", "trainval")], out)
    data = json.loads(out.read_text())
    assert [image["id"] for image in data["images"]] == [1, 2, 3]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4]
    assert [a["image_id"] for a in data["annotations"]] == [1, 2, 2, 3]
    assert data["images"][2]["file_name"] == "VOC2012/JPEGImages/2008_000008.jpg"
    assert all((voc_root / image["file_name"]).is_file() for image in data["images"])
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (40, 30)
    assert summary == {
        "out_json": str(out),
        "images": 3,
        "annotations": 4,
        "difficult": 1,
        "per_set": {"2007:trainval": 2, "2012:trainval": 1},
    }
    assert len(COCO(str(out)).getAnnIds()) == 4


def test_parse_voc_xml_returns_size_and_objects(voc_root):
    width, height, objects = parse_voc_xml(voc_root / "VOC2007" / "Annotations" / "000007.xml")
    assert (width, height) == (40, 30)
    assert [o["category_id"] for o in objects] == [7, 15]


def test_missing_split_file_names_it(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test\.txt"):
        voc_to_coco(voc_root, [("2007", "test")], tmp_path / "out.json")


def test_missing_xml_and_missing_image_name_the_file(voc_root, tmp_path):
    (voc_root / "VOC2007" / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000007\.xml"):
        voc_to_coco(voc_root, [("2007", "trainval")], tmp_path / "out.json")
    (voc_root / "VOC2012" / "JPEGImages" / "2008_000008.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2008_000008\.jpg"):
        voc_to_coco(voc_root, [("2012", "trainval")], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "xml, message",
    [
        (_image_xml("000009", 40, 30, [_object_xml("unicorn", (1, 1, 5, 5))]), "unicorn"),
        ("<annotation><size><width>40</width>", "malformed xml"),
        (_image_xml("000009", 40, 30, [_object_xml("dog", (9, 1, 5, 5))]), "inverted box"),
        (_image_xml("000009", 40, 30, [_object_xml("dog", ("a", 1, 5, 5))]), "not a number"),
        ("<annotation><object><name>dog</name></object></annotation>", "missing <size>"),
        (_image_xml("000009", 0, 30, []), "non-positive image size"),
    ],
)
def test_bad_xml_raises_naming_the_file(voc_root, tmp_path, xml, message):
    _add_image(voc_root, "2007", "000009", xml)
    _write_split(voc_root, "2007", "val", ["000009"])
    with pytest.raises(ValueError, match=message) as raised:
        voc_to_coco(voc_root, [("2007", "val")], tmp_path / "out.json")
    assert "000009.xml" in str(raised.value)


def test_image_listed_twice_is_an_error(voc_root, tmp_path):
    _write_split(voc_root, "2007", "train", ["000005"])
    with pytest.raises(ValueError, match="listed twice"):
        voc_to_coco(voc_root, [("2007", "trainval"), ("2007", "train")], tmp_path / "out.json")


def test_empty_sets_is_an_error(voc_root, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        voc_to_coco(voc_root, [], tmp_path / "out.json")
