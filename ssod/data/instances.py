"""Object instances cut by their masks from a COCO-format source (the pasted testbed's material).

:func:`read_source` reads a COCO json whose annotations have ``segmentation`` masks
(polygons or RLE) and the photographs they belong to, and returns:

- the kept classes: the ``num_classes`` categories with the most usable instances in the
  train pool among those that have at least ``MIN_POOL_INSTANCES`` in each pool, most
  frequent first (ties by category id);
- per pool (``train`` / ``eval``) and kept class, the usable instances as cut-outs: the
  pixels of the instance's box and its mask;
- distractors: usable train-pool instances of every other category;
- per pool, the photographs as backdrops, each with the union of the masks of every
  kept-class annotation (crowd and small ones included), which background crops avoid.

A source image belongs to one pool, chosen by a hash of its ``file_name`` alone (about
``eval_fraction`` of them go to ``eval``), so no instance or backdrop is shared between the
pools, and every seed of a recipe sees the same pools and classes.

A source image whose license forbids derivatives (its ``licenses`` entry says "NoDerivs" or
its url is a ``by-nd``/``by-nc-nd`` one: 40 of coco128's 128) gives neither instances nor
backdrops, since the testbed writes composites of them to disk; ``skipped`` counts them as
``no_derivatives_images``.

An instance is usable unless it is a crowd region, its box is narrower or lower than
``min_side`` source pixels, or its mask covers less than ``MIN_MASK_FILL`` of its box
(nothing, a sliver, a few scattered fragments); each reason is counted in ``skipped``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ssod.data.coco import DatasetError

POOLS = ("train", "eval")
MIN_POOL_INSTANCES = 2
MIN_MASK_FILL = 0.1


@dataclass(frozen=True)
class Cutout:
    """One source instance: ``pixels`` [h, w, 3] uint8 is its box region, ``mask`` [h, w] bool."""

    annotation_id: int
    image_id: int
    category_id: int
    pixels: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Backdrop:
    """One source photograph: ``pixels`` [H, W, 3] uint8; ``objects`` [H, W] bool marks the
    kept classes' annotated pixels."""

    image_id: int
    pixels: np.ndarray
    objects: np.ndarray


@dataclass
class Source:
    """What :func:`read_source` returns; categories are source entries (``id``, ``name``, ...)."""

    categories: list[dict]
    instances: dict[str, dict[int, list[Cutout]]]
    distractors: list[Cutout]
    backdrops: dict[str, list[Backdrop]]
    distractor_names: dict[int, str]
    skipped: Counter = field(default_factory=Counter)


def pool_of(file_name: str, eval_fraction: float) -> str:
    """``train`` or ``eval`` for one source image, from a hash of its file name alone."""
    draw = int(hashlib.sha256(file_name.encode()).hexdigest()[:8], 16) / 2**32
    return "eval" if draw < eval_fraction else "train"


def check_source(source_json: Path, source_images: Path) -> None:
    """A missing source is a :class:`DatasetError` of one line naming the path."""
    if not Path(source_json).is_file():
        raise DatasetError(f"{source_json}: source COCO json not found (data.pasted.source_json: the pasted "
                           "testbed cuts its objects from a COCO json with instance masks)")
    if not Path(source_images).is_dir():
        raise DatasetError(f"{source_images}: source image folder not found (data.pasted.source_images)")


def load_source_json(source_json: Path) -> dict:
    try:
        data = json.loads(Path(source_json).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{source_json}: not valid JSON ({error})") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"{source_json}: no '{key}' list")
    return data


def decode_mask(segmentation, height: int, width: int) -> np.ndarray | None:
    """[height, width] bool from COCO polygons or RLE; None when there is no usable polygon."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        return None
    with warnings.catch_warnings():  # pycocotools' decode under NumPy 2, once per call: noise
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
        return mask_utils.decode(rle).astype(bool)


def _usable(annotation: dict, mask: np.ndarray | None, min_side: int) -> str | None:
    """Why the instance is not usable (a ``skipped`` key), or None."""
    if annotation.get("iscrowd", 0):
        return "crowd"
    width, height = annotation["bbox"][2:]
    if width < min_side or height < min_side:
        return "small"
    if mask is None or mask.sum() < MIN_MASK_FILL * width * height:
        return "sparse_mask"
    return None


def _cut(annotation: dict, mask: np.ndarray, pixels: np.ndarray) -> Cutout:
    rows, columns = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    return Cutout(annotation["id"], annotation["image_id"], annotation["category_id"],
                  pixels[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy())


def _forbids_derivatives(license_entry: dict) -> bool:
    """A COCO ``licenses`` entry of a NoDerivs license (by name, or a creativecommons by-nd url)."""
    name, url = str(license_entry.get("name", "")), str(license_entry.get("url", ""))
    return "noderivs" in name.replace(" ", "").replace("-", "").lower() or "-nd/" in url or "-nd-" in url


def _choose_categories(data: dict, usable: dict[str, Counter], num_classes: int, source_json: Path) -> list[dict]:
    by_id = {category["id"]: category for category in data["categories"]}
    candidates = [c for c in by_id if all(usable[pool][c] >= MIN_POOL_INSTANCES for pool in POOLS)]
    candidates.sort(key=lambda c: (-usable["train"][c], c))
    if len(candidates) < num_classes:
        raise DatasetError(f"{source_json}: only {len(candidates)} categories have {MIN_POOL_INSTANCES} usable "
                           f"instances in each pool; the recipe asks for {num_classes}")
    return [by_id[c] for c in candidates[:num_classes]]


def read_source(source_json: Path, source_images: Path, num_classes: int, min_side: int,
                eval_fraction: float) -> Source:
    """Cut-outs, distractors and backdrops of a COCO source (module docstring)."""
    check_source(source_json, source_images)
    data = load_source_json(source_json)
    annotations_of = defaultdict(list)
    for annotation in data["annotations"]:
        annotations_of[annotation["image_id"]].append(annotation)
    no_derivatives = {entry["id"] for entry in data.get("licenses", ()) if _forbids_derivatives(entry)}
    allowed = [image for image in data["images"] if image.get("license") not in no_derivatives]
    if not allowed:
        raise DatasetError(f"{source_json}: every image's license forbids derivatives (NoDerivs): "
                           "the testbed would write composites of them")
    dropped = len(data["images"]) - len(allowed)
    data = {**data, "images": allowed}
    pool_by_image = {image["id"]: pool_of(image["file_name"], eval_fraction) for image in data["images"]}
    # Masks are decoded twice (here to count, below to cut): keeping them all would take
    # hundreds of MB for a source the size of coco128.
    skipped, usable = Counter(), {pool: Counter() for pool in POOLS}
    if dropped:
        skipped["no_derivatives_images"] = dropped
    for image in data["images"]:
        for annotation in annotations_of[image["id"]]:
            mask = decode_mask(annotation.get("segmentation"), image["height"], image["width"])
            reason = _usable(annotation, mask, min_side)
            if reason:
                skipped[reason] += 1
            else:
                usable[pool_by_image[image["id"]]][annotation["category_id"]] += 1
    categories = _choose_categories(data, usable, num_classes, source_json)
    kept = {category["id"] for category in categories}
    source = Source(categories, {pool: {c: [] for c in kept} for pool in POOLS}, [],
                    {pool: [] for pool in POOLS}, {}, skipped)
    names = {category["id"]: category["name"] for category in data["categories"]}
    for image in sorted(data["images"], key=lambda entry: entry["id"]):
        pool = pool_by_image[image["id"]]
        path = Path(source_images) / image["file_name"]
        try:
            with Image.open(path) as opened:
                pixels = np.asarray(opened.convert("RGB"))
        except OSError as error:
            raise DatasetError(f"{path}: source image unreadable ({error})") from error
        objects = np.zeros(pixels.shape[:2], dtype=bool)
        for annotation in annotations_of[image["id"]]:
            mask = decode_mask(annotation.get("segmentation"), image["height"], image["width"])
            if annotation["category_id"] in kept and mask is not None:
                objects |= mask
            if mask is None or _usable(annotation, mask, min_side):
                continue
            if annotation["category_id"] in kept:
                source.instances[pool][annotation["category_id"]].append(_cut(annotation, mask, pixels))
            elif pool == "train":
                source.distractors.append(_cut(annotation, mask, pixels))
                source.distractor_names[annotation["category_id"]] = names[annotation["category_id"]]
        source.backdrops[pool].append(Backdrop(image["id"], pixels, objects))
    return source
