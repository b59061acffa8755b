"""Validate a COCO-format dataset before anyone spends GPU hours on it.

:func:`check_dataset` reads the json and (optionally) opens and fully decodes every image.
Every message names the json or image file and the image / annotation / category id.

Errors (the dataset must be fixed; ``ssod-data check`` exits 1):
  missing, empty, malformed or non-object json; ``images`` missing, not a list or empty;
  ``categories`` missing; an entry without an id; duplicate image, annotation or category
  ids; an image entry without ``file_name`` or with a non-positive / non-numeric
  width or height; a missing, unreadable, truncated or corrupt image file; an image
  whose real size differs from the json's width/height (its boxes would not line up);
  an annotation with an unknown image id or category id; a bbox that is not four
  numbers; NaN or infinite numbers in bbox or area.

Warnings (training copes, but you should know):
  a non-RGB image mode (L, CMYK, RGBA, I;16, P, ...; training converts to RGB); a box
  with zero or negative width or height (torchvision asserts on those: the loader must
  drop them); a box extending outside the image (the loader should clip it); an
  annotation without ``area`` (COCOeval needs it); duplicate category names; no
  ``annotations`` key at all.

Images are decoded with ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` forced off for the
duration of the check (it is a process-wide switch; it is restored afterwards), so a
truncated file is an error rather than a grey stripe.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from ssod.data.splits import load_coco_json

__all__ = ["CheckReport", "check_dataset", "format_report"]


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`.

    ``per_class``: annotation count per category name (every category, zeros included).
    ``errors`` / ``warnings``: one human-readable message each, naming file and id.
    """

    coco_json: Path
    images: int = 0
    annotations: int = 0
    images_without_annotations: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors


def _duplicates(values: list[Any]) -> list[Any]:
    return [value for value, count in Counter(values).items() if count > 1]


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_categories(data: dict[str, Any], report: CheckReport) -> dict[Any, str]:
    source = report.coco_json
    categories = data.get("categories")
    if not isinstance(categories, list):
        report.errors.append(f"{source}: missing or non-list 'categories'")
        return {}
    names: dict[Any, str] = {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category:
            report.errors.append(f"{source}: category at position {position} has no 'id'")
            continue
        names.setdefault(category["id"], str(category.get("name", category["id"])))
    ids = [c["id"] for c in categories if isinstance(c, dict) and "id" in c]
    for category_id in _duplicates(ids):
        report.errors.append(f"{source}: duplicate category id {category_id}")
    for name in _duplicates(list(names.values())):
        report.warnings.append(f"{source}: duplicate category name {name!r}")
    return names


def _check_image_entries(data: dict[str, Any], report: CheckReport) -> dict[Any, dict[str, Any]]:
    source = report.coco_json
    images = data["images"]
    report.images = len(images)
    if not images:
        report.errors.append(f"{source}: 'images' is empty")
    by_id: dict[Any, dict[str, Any]] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            report.errors.append(f"{source}: image at position {position} has no 'id'")
            continue
        if image["id"] in by_id:
            report.errors.append(f"{source}: duplicate image id {image['id']}")
            continue
        by_id[image["id"]] = image
        if not isinstance(image.get("file_name"), str):
            report.errors.append(f"{source}: image id {image['id']} has no 'file_name'")
        for key in ("width", "height"):
            if not _is_positive_number(image.get(key)):
                report.errors.append(
                    f"{source}: image id {image['id']} has invalid {key} {image.get(key)!r}"
                )
    return by_id


def _inspect_image(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(error, (width, height), mode) from fully decoding ``path``."""
    if not path.is_file():
        return "missing image file", None, None
    try:
        with Image.open(path) as image:
            image.load()
            return None, image.size, image.mode
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        return f"unreadable or corrupt image ({type(error).__name__}: {error})", None, None


def _check_image_files(
    by_id: dict[Any, dict[str, Any]], image_dir: Path, report: CheckReport
) -> None:
    entries = [(key, e) for key, e in by_id.items() if isinstance(e.get("file_name"), str)]
    paths = [Path(image_dir) / entry["file_name"] for _, entry in entries]
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        # Pillow decodes outside the GIL, so threads speed up a large dataset.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(_inspect_image, paths))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    for (image_id, entry), path, (error, size, mode) in zip(entries, paths, results):
        where = f"{path} (image id {image_id})"
        if error is not None:
            report.errors.append(f"{where}: {error}")
            continue
        expected = (entry.get("width"), entry.get("height"))
        if size != expected:
            report.errors.append(
                f"{where}: file is {size[0]}x{size[1]} but the json says "
                f"{expected[0]}x{expected[1]} (width x height)"
            )
        if mode != "RGB":
            report.warnings.append(f"{where}: image mode {mode} is not RGB (training converts it)")


def _bbox_problem(bbox: Any) -> str | None:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"bbox {bbox!r} is not a list of 4 numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return f"bbox {bbox!r} is not a list of 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} has NaN or infinite numbers"
    return None


def _check_one_annotation(
    annotation: dict[str, Any],
    by_id: dict[Any, dict[str, Any]],
    category_names: dict[Any, str],
    report: CheckReport,
) -> None:
    where = f"{report.coco_json}: annotation id {annotation['id']}"
    image = by_id.get(annotation.get("image_id"))
    if image is None:
        report.errors.append(f"{where}: unknown image id {annotation.get('image_id')!r}")
    if annotation.get("category_id") not in category_names:
        report.errors.append(f"{where}: unknown category id {annotation.get('category_id')!r}")
    else:
        report.per_class[category_names[annotation["category_id"]]] += 1
    area = annotation.get("area")
    if area is None:
        report.warnings.append(f"{where}: no 'area' (COCOeval needs it)")
    elif not isinstance(area, (int, float)) or not math.isfinite(area):
        report.errors.append(f"{where}: area {area!r} is NaN, infinite or not a number")
    problem = _bbox_problem(annotation.get("bbox"))
    if problem is not None:
        report.errors.append(f"{where}: {problem}")
        return
    x, y, width, height = annotation["bbox"]
    if width <= 0 or height <= 0:
        report.warnings.append(f"{where}: zero or negative size bbox {annotation['bbox']}")
    if image is not None and _is_positive_number(image.get("width")) and _is_positive_number(
        image.get("height")
    ):
        if x < 0 or y < 0 or x + width > image["width"] or y + height > image["height"]:
            report.warnings.append(
                f"{where}: bbox {annotation['bbox']} (xywh) extends outside image id "
                f"{image['id']} of size {image['width']}x{image['height']}"
            )


def _check_annotations(
    data: dict[str, Any],
    by_id: dict[Any, dict[str, Any]],
    category_names: dict[Any, str],
    report: CheckReport,
) -> None:
    source = report.coco_json
    if "annotations" not in data:
        report.warnings.append(f"{source}: no 'annotations' key (an image-info file?)")
        return
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        report.errors.append(f"{source}: 'annotations' is not a list")
        return
    report.annotations = len(annotations)
    report.per_class = {name: 0 for name in category_names.values()}
    seen_ids: set[Any] = set()
    annotated_images: set[Any] = set()
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "id" not in annotation:
            report.errors.append(f"{source}: annotation at position {position} has no 'id'")
            continue
        if annotation["id"] in seen_ids:
            report.errors.append(f"{source}: duplicate annotation id {annotation['id']}")
        seen_ids.add(annotation["id"])
        annotated_images.add(annotation.get("image_id"))
        _check_one_annotation(annotation, by_id, category_names, report)
    report.images_without_annotations = len(set(by_id) - annotated_images)
    if by_id and not annotations:
        report.warnings.append(f"{source}: no annotations at all: usable as unlabeled images, but training refuses "
                               "it as a labeled set")


def check_dataset(coco_json: Path, image_dir: Path, *, check_images: bool = True) -> CheckReport:
    """Check a COCO json (bboxes xywh absolute pixels) and the images under ``image_dir``.

    ``image_dir / image["file_name"]`` is each image's path. ``check_images=False`` skips
    opening the files (json checks only). Never raises for bad data: every problem lands
    in the returned report's ``errors`` or ``warnings`` (classification in module doc).
    """
    coco_json = Path(coco_json)
    report = CheckReport(coco_json=coco_json)
    try:
        data = load_coco_json(coco_json)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        report.errors.append(str(error))
        return report
    category_names = _check_categories(data, report)
    by_id = _check_image_entries(data, report)
    if check_images:
        _check_image_files(by_id, Path(image_dir), report)
    _check_annotations(data, by_id, category_names, report)
    return report


def _limited(title: str, messages: list[str], limit: int) -> list[str]:
    lines = [f"{title} ({len(messages)}):"] + [f"  - {m}" for m in messages[:limit]]
    if len(messages) > limit:
        lines.append(f"  ... and {len(messages) - limit} more")
    return lines


def format_report(report: CheckReport, max_messages: int = 50) -> str:
    """Human-readable summary; at most ``max_messages`` errors and warnings each."""
    lines = [
        f"dataset: {report.coco_json}",
        f"images: {report.images} ({report.images_without_annotations} without annotations)",
        f"annotations: {report.annotations}",
    ]
    if report.per_class:
        lines.append("annotations per class:")
        lines += [f"  {name}: {count}" for name, count in report.per_class.items()]
    lines += _limited("errors", report.errors, max_messages)
    lines += _limited("warnings", report.warnings, max_messages)
    lines.append("result: " + ("OK" if report.ok else "FAILED"))
    return "\n".join(lines)
