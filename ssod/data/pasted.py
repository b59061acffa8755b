"""The pasted testbed: real object instances cut by their masks and pasted onto real photographs.

The second built-in testbed, real-looking where the synthetic one is shapes. Its material
is any COCO-format source with instance masks (``data.pasted.source_json`` and
``source_images``; ours is ``../shared/data/coco128``, read in place, never copied into
the project). ``ensure_pasted`` composes it deterministically from a ``PastedRecipe`` on
first use into the dataset cache (``ssod.data.cache``):

    <cache>/pasted-<hash>/train/000001.jpg ...    annotations/train.json   labeled or unlabeled by data.percent
                                                  annotations/open.json    always unlabeled, with distractors
    <cache>/pasted-<hash>/val/000001.jpg ...      annotations/val.json
    <cache>/pasted-<hash>/test/000001.jpg ...     annotations/test.json    (num_test > 0)

``<hash>`` covers the recipe, ``GENERATOR_VERSION`` and the source json's bytes (not its
images: a source whose photographs change under the same json must get a new recipe).

How an image is made (``ssod.data.instances`` cuts the material):

- Source pools: each source image is in the train pool or the eval pool (a hash of its
  file name, ``eval_fraction`` of them eval). train and open images take instances and
  backgrounds from the train pool only, val and test from the eval pool only: no source
  instance appears on both sides. val and test share the eval pool (coco128 is too small
  for three), in different compositions.
- Classes: the ``num_classes`` most frequent usable categories of the source; class k (0 =
  the most frequent) is drawn with weight ``(k + 1) ** -tail``: long-tailed, the same in
  every split. An instance of the class is drawn uniformly from its pool.
- Background: a crop of a pool photograph, zoomed by 0.75-2.5 (as the photograph allows),
  maybe mirrored, chosen among up to 30 tries as the first with at most 2% of its pixels on
  a kept-class annotation (else the one with the fewest). Other things in the photograph
  (tables, walls, cars when cars are not kept) stay as real clutter.
- Objects, 1-5 (``objects_per_image``): side (square root of the box area) log-uniform in
  ``object_size``, at most ``max_upscale`` times the source size, mirrored half the time,
  pasted in turn with a softened mask edge, a later one over the earlier ones. Up to half an
  object may stand outside the image. A placement is taken only if every object so far keeps
  at least ``min_visible`` of its mask in view (not covered, not outside): so every object is
  visible enough to be labeled, and none is left unlabeled; otherwise up to 10 other places are
  tried, then the object is left out.
- Open images (``num_open``): also 1-2 distractors, instances of source categories outside
  the kept classes, placed among the objects under the same rule and annotated nowhere.

Annotations: ``bbox`` (xywh, whole pixels) is the tight box of the object's visible mask,
inside the image; ``area`` is that mask's pixel count and ``segmentation`` its RLE;
``source_annotation_id`` / ``source_image_id`` name the instance pasted. Each image entry
names its ``source_background_id``; open images list their ``distractors`` (source category
name, source annotation id, visible box). Categories are ids 1..K, most frequent first,
with the source's names and their ``source_id``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ssod.data.cache import build_once
from ssod.data.compose import background, composite, place, scaled, visible_box
from ssod.data.instances import POOLS, Source, check_source, read_source
from ssod.data.splits import load_coco_json
from ssod.io import write_json_atomic

# Bump when the composing code changes, so caches written by older code are not reused.
GENERATOR_VERSION = 2  # 2: no source image whose license forbids derivatives
# name, random-stream index, source pool, with distractors
_SPLITS = (("train", 0, "train", False), ("val", 1, "eval", False), ("test", 2, "eval", False),
           ("open", 3, "train", True))
_BACKGROUND_TRIES = 30
_BACKGROUND_MAX_OBJECTS = 0.02
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class PastedRecipe:
    """Everything besides the source that determines the dataset; ranges are inclusive (min, max)."""

    seed: int = 0
    num_train: int = 1200
    num_open: int = 200
    num_val: int = 200
    num_test: int = 0
    num_classes: int = 8
    tail: float = 1.0
    image_size: tuple[int, int] = (160, 224)
    objects_per_image: tuple[int, int] = (1, 5)
    distractors_per_image: tuple[int, int] = (1, 2)
    object_size: tuple[float, float] = (20.0, 110.0)
    max_upscale: float = 2.0
    min_visible: float = 0.5
    min_instance_side: int = 32
    eval_fraction: float = 0.3

    def __post_init__(self) -> None:
        # Normalise types so that a YAML list or an int where a float belongs hashes the same.
        for item in fields(self):
            value = getattr(self, item.name)
            cast = float if "float" in str(item.type) else int
            value = tuple(cast(v) for v in value) if "tuple" in str(item.type) else cast(value)
            object.__setattr__(self, item.name, value)
        for name in ("image_size", "objects_per_image", "distractors_per_image", "object_size"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < min <= max, got {(low, high)}")
        if self.num_train < 1 or self.num_val < 1 or min(self.num_open, self.num_test) < 0 or self.num_classes < 1:
            raise ValueError("need num_train, num_val, num_classes >= 1 and num_open, num_test >= 0")
        if not (0 < self.min_visible <= 1 and 0 < self.eval_fraction < 1 and self.tail >= 0 and self.max_upscale > 0):
            raise ValueError("need min_visible in (0, 1], eval_fraction in (0, 1), tail >= 0, max_upscale > 0")

    def fingerprint(self, source_digest: str) -> str:
        """Short hash of the recipe, the generator version and the source (names the cache directory)."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, "source": source_digest, **asdict(self)},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class PastedPaths:
    """Where a composed dataset lives; open images sit in the train image folder."""

    root: Path

    @property
    def train_json(self) -> Path:
        return self.root / "annotations/train.json"

    @property
    def open_json(self) -> Path:
        return self.root / "annotations/open.json"

    @property
    def val_json(self) -> Path:
        return self.root / "annotations/val.json"

    @property
    def test_json(self) -> Path:  # present when the recipe has num_test > 0
        return self.root / "annotations/test.json"

    def images(self, split: str) -> Path:
        return self.root / ("train" if split == "open" else split)


def ensure_pasted(cache_dir: Path, source_json: Path, source_images: Path,
                  recipe: PastedRecipe = PastedRecipe()) -> PastedPaths:
    """Return the dataset for ``recipe`` and the source under ``cache_dir``, composing it first if absent.

    A missing source is a ``DatasetError`` of one line naming the path. Safe for concurrent
    callers and for a killed builder (``ssod.data.cache.build_once``).
    """
    source_json, source_images = Path(source_json), Path(source_images)
    check_source(source_json, source_images)
    digest = hashlib.sha256(source_json.read_bytes()).hexdigest()
    target = Path(cache_dir) / f"pasted-{recipe.fingerprint(digest)}"
    build_once(target, lambda building: _build_dataset(building, recipe, source_json, source_images, digest))
    return PastedPaths(target)


def with_open_images(unlabeled_json: Path, paths: PastedPaths) -> Path:
    """The unlabeled split file with the open images added (``<stem>+open.json`` beside it)."""
    merged_path = unlabeled_json.with_name(f"{unlabeled_json.stem}+open.json")
    if not merged_path.is_file():
        merged, extra = load_coco_json(unlabeled_json), load_coco_json(paths.open_json)
        merged["images"] = merged["images"] + extra["images"]
        merged["annotations"] = merged["annotations"] + extra["annotations"]
        write_json_atomic(merged, merged_path)
    return merged_path


def _build_dataset(root: Path, recipe: PastedRecipe, source_json: Path, source_images: Path, digest: str) -> None:
    source = read_source(source_json, source_images, recipe.num_classes, recipe.min_instance_side,
                         recipe.eval_fraction)
    (root / "annotations").mkdir(parents=True)
    (root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    summary = {"source_json": str(source_json), "source_sha256": digest, "skipped_instances": dict(source.skipped),
               "instances": {pool: {str(c): len(v) for c, v in source.instances[pool].items()} for pool in POOLS},
               "backgrounds": {pool: len(source.backdrops[pool]) for pool in POOLS},
               "distractors": len(source.distractors), "distractor_categories": sorted(source.distractor_names.values())}
    (root / "source.json").write_text(json.dumps(summary, indent=2) + "\n")
    counts = {"train": recipe.num_train, "val": recipe.num_val, "test": recipe.num_test, "open": recipe.num_open}
    train_annotations = 0
    for split, stream, pool, open_set in _SPLITS:
        if split == "test" and not counts[split]:
            continue
        # Open images and their annotations continue the train ids: they share a folder and,
        # once split, the unlabeled file.
        first_id, first_annotation = (recipe.num_train + 1, train_annotations + 1) if open_set else (1, 1)
        written = _write_split(root, split, source, range(first_id, first_id + counts[split]), first_annotation,
                               lambda image_id: _compose(np.random.default_rng([recipe.seed, stream, image_id]),
                                                         recipe, source, pool, open_set))
        train_annotations = written if split == "train" else train_annotations


def _coco_header(source: Source, split: str) -> dict:
    categories = [{"id": index + 1, "name": category["name"], "supercategory": category.get("supercategory", ""),
                   "source_id": category["id"]} for index, category in enumerate(source.categories)]
    return {"info": {"description": f"ssod pasted testbed, {split}", "version": str(GENERATOR_VERSION)},
            "licenses": [], "annotations": [], "categories": categories}


def _write_split(root: Path, split: str, source: Source, image_ids: range, first_annotation: int, compose) -> int:
    """Compose and write one split's images and json; returns its number of annotations."""
    image_dir = root / ("train" if split == "open" else split)
    image_dir.mkdir(exist_ok=True)
    dataset = {**_coco_header(source, split), "images": [], "annotations": []}
    for image_id in image_ids:
        picture, background_id, objects, distractors = compose(image_id)
        file_name = f"{image_id:06d}.jpg"
        picture.save(image_dir / file_name, quality=_JPEG_QUALITY, subsampling=0)
        image = {"id": image_id, "file_name": file_name, "width": picture.width, "height": picture.height,
                 "source_background_id": background_id}
        if split == "open":
            image["distractors"] = distractors
        dataset["images"].append(image)
        for label, box, visible, cutout in objects:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            dataset["annotations"].append({
                "id": first_annotation + len(dataset["annotations"]), "image_id": image_id, "category_id": label,
                "bbox": [float(v) for v in box], "area": float(visible.sum()), "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                "source_annotation_id": cutout.annotation_id, "source_image_id": cutout.image_id,
            })
    (root / "annotations" / f"{split}.json").write_text(json.dumps(dataset))
    return len(dataset["annotations"])


def _compose(rng: np.random.Generator, recipe: PastedRecipe, source: Source, pool: str, open_set: bool):
    """One image: (picture, background's source image id, objects as (label, xywh box, visible
    mask [H, W] bool, cut-out), distractors as dicts for the image entry)."""
    width, height = (int(v) for v in rng.integers(*recipe.image_size, endpoint=True, size=2))
    canvas, background_id = background(rng, source.backdrops[pool], width, height, _BACKGROUND_TRIES,
                                       _BACKGROUND_MAX_OBJECTS)
    weights = np.arange(1, len(source.categories) + 1, dtype=np.float64) ** -recipe.tail
    labels = list(1 + rng.choice(len(source.categories), p=weights / weights.sum(),
                                 size=int(rng.integers(*recipe.objects_per_image, endpoint=True))))
    if open_set:
        labels += [0] * int(rng.integers(*recipe.distractors_per_image, endpoint=True))
        rng.shuffle(labels)
    owner = np.zeros((height, width), dtype=np.int32)
    layers, placed = [], []
    log_low, log_high = (math.log(v) for v in recipe.object_size)
    for label in labels:
        if label:
            candidates = source.instances[pool][source.categories[label - 1]["id"]]
        else:
            candidates = source.distractors
        cutout = candidates[int(rng.integers(len(candidates)))]
        pixels, mask = scaled(cutout, math.exp(rng.uniform(log_low, log_high)), recipe.max_upscale, rng.random() < 0.5)
        layer = place(rng, owner, layers, pixels, mask, recipe.min_visible)
        if layer is not None:
            layers.append(layer)
            placed.append((int(label), cutout))
    composite(canvas, layers)
    objects, distractors = [], []
    for number, (label, cutout) in enumerate(placed, start=1):
        box, visible = visible_box(owner, number)
        if label:
            objects.append((label, box, visible, cutout))
        else:
            distractors.append({"name": source.distractor_names[cutout.category_id],
                                "source_annotation_id": cutout.annotation_id, "bbox": list(box)})
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), background_id, objects, distractors
