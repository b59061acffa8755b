"""Dataset check: each kind of breakage is found, named, and classed as error or warning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile

from ssod.data.check import check_dataset, format_report

COCO128 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128"
WIDTH, HEIGHT = 64, 48


def _noise_jpeg(path: Path) -> None:
    # Noise keeps the file large enough that cutting it in half truncates scan data.
    pixels = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def _base(tmp_path: Path) -> dict:
    """A valid two-image dataset under tmp_path/images; returns the json dict."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    _noise_jpeg(image_dir / "a.jpg")
    _noise_jpeg(image_dir / "b.jpg")
    box = {"iscrowd": 0, "bbox": [2.0, 3.0, 10.0, 20.0], "area": 200.0}
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "b.jpg", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, **box},
            {"id": 11, "image_id": 1, "category_id": 5, **box},
            {"id": 12, "image_id": 2, "category_id": 3, **box},
        ],
        "categories": [
            {"id": 3, "name": "car"},
            {"id": 5, "name": "dog"},
            {"id": 7, "name": "cat"},
        ],
    }


def _check(tmp_path: Path, data: dict, **kwargs):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return check_dataset(path, tmp_path / "images", **kwargs)


def test_valid_dataset_has_no_findings_and_counts_per_class(tmp_path: Path):
    report = _check(tmp_path, _base(tmp_path))
    assert report.errors == [] and report.warnings == []
    assert report.ok
    assert (report.images, report.annotations) == (2, 3)
    assert report.per_class == {"car": 2, "dog": 1, "cat": 0}
    assert report.images_without_annotations == 0


def _truncated_jpeg(data: dict, images: Path) -> None:
    raw = (images / "a.jpg").read_bytes()
    (images / "a.jpg").write_bytes(raw[: len(raw) // 2])


def _garbage_jpeg(data: dict, images: Path) -> None:
    (images / "a.jpg").write_bytes(b"this is not a jpeg at all")


def _replace_image(mode: str, name: str, data: dict, images: Path, pixels=None) -> None:
    image = Image.new(mode, (WIDTH, HEIGHT)) if pixels is None else Image.fromarray(pixels)
    image.save(images / name)
    data["images"][0]["file_name"] = name


def _cmyk(data, images):
    _replace_image("CMYK", "cmyk.jpg", data, images)


def _sixteen_bit(data, images):
    pixels = (np.arange(WIDTH * HEIGHT, dtype=np.uint16).reshape(HEIGHT, WIDTH) * 20)
    _replace_image("I;16", "deep.png", data, images, pixels)


def _rgba(data, images):
    _replace_image("RGBA", "alpha.png", data, images)


def _set(path: tuple, value) -> Callable[[dict, Path], None]:
    def mutate(data: dict, images: Path) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _missing_file(data, images):
    (images / "b.jpg").unlink()


def _drop_area(data, images):
    del data["annotations"][0]["area"]


CASES = {
    "truncated jpeg": (_truncated_jpeg, "error", "a.jpg (image id 1): unreadable or corrupt"),
    "garbage jpeg": (_garbage_jpeg, "error", "a.jpg (image id 1): unreadable or corrupt"),
    "missing image file": (_missing_file, "error", "b.jpg (image id 2): missing image file"),
    "wrong size in json": (
        _set(("images", 1, "width"), 80),
        "error",
        "b.jpg (image id 2): file is 64x48 but the json says 80x48",
    ),
    "cmyk jpeg": (_cmyk, "warning", "cmyk.jpg (image id 1): image mode CMYK is not RGB"),
    "16-bit png": (_sixteen_bit, "warning", "deep.png (image id 1): image mode I;16 is not RGB"),
    "rgba png": (_rgba, "warning", "alpha.png (image id 1): image mode RGBA is not RGB"),
    "box outside image": (
        _set(("annotations", 0, "bbox"), [60.0, 3.0, 10.0, 20.0]),
        "warning",
        "annotation id 10: bbox [60.0, 3.0, 10.0, 20.0] (xywh) extends outside image id 1",
    ),
    "negative x": (
        _set(("annotations", 1, "bbox"), [-1.0, 3.0, 10.0, 20.0]),
        "warning",
        "annotation id 11: bbox [-1.0, 3.0, 10.0, 20.0] (xywh) extends outside",
    ),
    "zero-width box": (
        _set(("annotations", 2, "bbox"), [2.0, 3.0, 0.0, 20.0]),
        "warning",
        "annotation id 12: zero or negative size bbox",
    ),
    "unknown category": (
        _set(("annotations", 0, "category_id"), 99),
        "error",
        "annotation id 10: unknown category id 99",
    ),
    "unknown image id": (
        _set(("annotations", 1, "image_id"), 12345),
        "error",
        "annotation id 11: unknown image id 12345",
    ),
    "duplicate image id": (_set(("images", 1, "id"), 1), "error", "duplicate image id 1"),
    "no annotations at all": (_set(("annotations",), []), "warning", "no annotations at all: usable as unlabeled"),
    "duplicate annotation id": (
        _set(("annotations", 2, "id"), 10),
        "error",
        "duplicate annotation id 10",
    ),
    "duplicate category id": (
        _set(("categories", 2, "id"), 3),
        "error",
        "duplicate category id 3",
    ),
    "nan bbox": (
        _set(("annotations", 0, "bbox"), [2.0, float("nan"), 10.0, 20.0]),
        "error",
        "annotation id 10: bbox [2.0, nan, 10.0, 20.0] has NaN or infinite numbers",
    ),
    "infinite area": (
        _set(("annotations", 1, "area"), float("inf")),
        "error",
        "annotation id 11: area inf is NaN, infinite or not a number",
    ),
    "short bbox": (
        _set(("annotations", 1, "bbox"), [1.0, 2.0, 3.0]),
        "error",
        "annotation id 11: bbox [1.0, 2.0, 3.0] is not a list of 4 numbers",
    ),
    "empty images list": (_set(("images",), []), "error", "data.json: 'images' is empty"),
    "missing area": (_drop_area, "warning", "annotation id 10: no 'area'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_dataset_is_reported(tmp_path: Path, name: str):
    mutate, kind, expected = CASES[name]
    data = _base(tmp_path)
    mutate(data, tmp_path / "images")
    report = _check(tmp_path, data)
    found, other = (report.errors, report.warnings)
    if kind == "warning":
        found, other = other, found
    assert any(expected in message for message in found), format_report(report)
    assert not any(expected in message for message in other)
    assert report.ok == (kind == "warning")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "file is empty"),
        ("   \n", "file is empty"),
        ('{"images": [}', "malformed json at line 1 column 13"),
        ("[1, 2]", "top level is a list"),
        ('{"annotations": []}', "missing or non-list 'images'"),
    ],
)
def test_unusable_json_is_one_error_naming_the_file(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "broken.json"
    path.write_text(content)
    report = check_dataset(path, tmp_path)
    assert len(report.errors) == 1
    assert str(path) in report.errors[0] and expected in report.errors[0]


def test_missing_json_is_an_error(tmp_path: Path):
    report = check_dataset(tmp_path / "nowhere.json", tmp_path)
    assert report.errors == [f"{tmp_path / 'nowhere.json'}: COCO json file not found"]


def test_check_images_false_skips_files(tmp_path: Path):
    data = _base(tmp_path)
    (tmp_path / "images" / "a.jpg").unlink()
    report = _check(tmp_path, data, check_images=False)
    assert report.ok and report.warnings == []


def test_truncated_image_is_an_error_even_when_pillow_is_told_to_tolerate(tmp_path: Path):
    data = _base(tmp_path)
    _truncated_jpeg(data, tmp_path / "images")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        report = _check(tmp_path, data)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the global switch must be restored"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    assert any("unreadable or corrupt" in message for message in report.errors)


def test_format_report_summarises_and_truncates(tmp_path: Path):
    data = _base(tmp_path)
    for annotation in data["annotations"]:
        annotation["category_id"] = 99
    text = format_report(_check(tmp_path, data), max_messages=2)
    assert "images: 2 (0 without annotations)" in text
    assert "annotations: 3" in text
    assert "errors (3):" in text and "... and 1 more" in text
    assert "  car: 0" in text
    assert text.endswith("result: FAILED")


def test_coco128_sample_has_no_errors():
    coco_json = COCO128 / "annotations" / "instances_train2017.json"
    if not coco_json.is_file():
        pytest.skip(f"real sample not found at {COCO128} (shared/ beside the repo)")
    report = check_dataset(coco_json, COCO128 / "train2017")
    assert report.errors == [], format_report(report)
    data = json.loads(coco_json.read_text())
    assert report.images == len(data["images"]) == 128
    assert report.annotations == len(data["annotations"])
    assert sum(report.per_class.values()) == report.annotations
