"""Pascal VOC xml annotations -> one COCO json, for VOC07 / VOC12 and their unions.

Layout read (``voc_root`` is the ``VOCdevkit`` directory)::

    VOCdevkit/VOC2007/ImageSets/Main/<split>.txt   one image stem per line
    VOCdevkit/VOC2007/Annotations/<stem>.xml
    VOCdevkit/VOC2007/JPEGImages/<stem>.jpg

Conventions of the written json:

- ``categories``: the 20 VOC classes in the standard (alphabetical) order, ids 1..20.
- ``images``: ids 1..N in the order of ``sets`` then of each split file, so several
  year/split inputs combine without collisions. ``file_name`` is relative to
  ``voc_root`` (``VOC2007/JPEGImages/000005.jpg``): use ``voc_root`` as the image dir.
  Width and height come from the xml ``<size>``.
- boxes: VOC stores 1-based inclusive pixel indices ``xmin..xmax``. Pixel ``i`` covers
  the continuous interval ``[i - 1, i]``, so the box is ``[xmin - 1, ymin - 1, xmax,
  ymax]`` in xyxy, i.e. COCO xywh ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin +
  1]``; a box over the whole image is ``[0, 0, W, H]``. ``area = w * h``.
- ``difficult`` objects are kept with ``iscrowd = 0``; every annotation carries
  ``difficult`` (0 or 1). Training leaves them out of its targets, as the reference does
  (mmdetection's converter marks them ``ignore``, which its loader skips), and COCOeval
  counts them as ground truth, as it does for the reference. (pycocotools overwrites
  any ``ignore`` field from ``iscrowd``, so the flag here is named ``difficult``.)

Errors (``FileNotFoundError`` / ``ValueError``) name the offending file: a missing split
file, xml or jpg, malformed xml, an unknown class name, a missing or non-numeric box
coordinate, a box with ``xmax < xmin`` or ``ymax < ymin``, an image listed twice.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from ssod.io import write_json_atomic

__all__ = ["VOC_CLASSES", "parse_voc_xml", "voc_to_coco"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
_CATEGORY_ID = {name: index + 1 for index, name in enumerate(VOC_CLASSES)}


def _text(element: ElementTree.Element, tag: str, xml_path: Path) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_path}: missing <{tag}> in <{element.tag}>")
    return child.text.strip()


def _number(element: ElementTree.Element, tag: str, xml_path: Path) -> float:
    text = _text(element, tag, xml_path)
    try:
        return float(text)
    except ValueError as error:
        raise ValueError(f"{xml_path}: <{tag}> is not a number: {text!r}") from error


def _parse_object(item: ElementTree.Element, xml_path: Path) -> dict[str, Any]:
    name = _text(item, "name", xml_path)
    if name not in _CATEGORY_ID:
        raise ValueError(f"{xml_path}: unknown class name {name!r} (not one of the 20 VOC classes)")
    box = item.find("bndbox")
    if box is None:
        raise ValueError(f"{xml_path}: object {name!r} has no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(box, tag, xml_path) for tag in _BOX_TAGS)
    if xmax < xmin or ymax < ymin:
        raise ValueError(
            f"{xml_path}: object {name!r} has an inverted box "
            f"xmin={xmin} ymin={ymin} xmax={xmax} ymax={ymax}"
        )
    difficult = item.find("difficult")
    is_difficult = difficult is not None and (difficult.text or "0").strip() not in ("", "0")
    width, height = xmax - xmin + 1, ymax - ymin + 1
    return {
        "category_id": _CATEGORY_ID[name],
        "bbox": [xmin - 1, ymin - 1, width, height],
        "area": width * height,
        "iscrowd": 0,
        "difficult": int(is_difficult),
    }


def parse_voc_xml(xml_path: Path) -> tuple[int, int, list[dict[str, Any]]]:
    """Parse one VOC xml file.

    Returns ``(width, height, objects)``; each object is a dict with ``category_id``
    (1..20), ``bbox`` (COCO xywh, see module docstring), ``area``, ``iscrowd`` (0) and
    ``difficult`` (0/1). Raises ``ValueError`` naming ``xml_path`` on malformed content.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"{xml_path}: annotation xml not found")
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{xml_path}: malformed xml: {error}") from error
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_path}: missing <size>")
    width, height = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))
    if width <= 0 or height <= 0:
        raise ValueError(f"{xml_path}: non-positive image size {width}x{height}")
    objects = [_parse_object(item, xml_path) for item in root.findall("object")]
    return width, height, objects


def _read_split(year_dir: Path, split: str) -> list[str]:
    split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: split file not found")
    stems = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not stems:
        raise ValueError(f"{split_file}: split file lists no images")
    return stems


def voc_to_coco(
    voc_root: Path, sets: list[tuple[str, str]], out_json: Path
) -> dict[str, Any]:
    """Convert VOC ``sets`` (``[("2007", "trainval"), ("2012", "trainval")]``) to one json.

    ``voc_root``: the ``VOCdevkit`` directory. Writes ``out_json`` atomically (COCO format,
    bboxes xywh absolute pixels, conventions in the module docstring). Returns a summary
    ``{"out_json", "images", "annotations", "difficult", "per_set": {"2007:trainval": n}}``.
    """
    voc_root = Path(voc_root)
    if not sets:
        raise ValueError("voc_to_coco needs at least one (year, split) set")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    per_set: dict[str, int] = {}
    seen: dict[str, str] = {}
    for year, split in sets:
        year_dir = voc_root / f"VOC{year}"
        stems = _read_split(year_dir, split)
        per_set[f"{year}:{split}"] = len(stems)
        for stem in stems:
            file_name = f"VOC{year}/JPEGImages/{stem}.jpg"
            if file_name in seen:
                raise ValueError(
                    f"{file_name} is listed twice ({seen[file_name]} and {year}:{split})"
                )
            seen[file_name] = f"{year}:{split}"
            if not (voc_root / file_name).is_file():
                raise FileNotFoundError(f"{voc_root / file_name}: image file not found")
            width, height, objects = parse_voc_xml(year_dir / "Annotations" / f"{stem}.xml")
            image_id = len(images) + 1
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height}
            )
            for item in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **item})
    categories = [
        {"id": _CATEGORY_ID[name], "name": name, "supercategory": "none"} for name in VOC_CLASSES
    ]
    sets_text = ", ".join(f"VOC{year} {split}" for year, split in sets)
    coco = {
        "info": {"description": f"Pascal VOC converted to COCO format: {sets_text}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    write_json_atomic(coco, out_json)
    return {
        "out_json": str(out_json),
        "images": len(images),
        "annotations": len(annotations),
        "difficult": sum(item["difficult"] for item in annotations),
        "per_set": per_set,
    }
