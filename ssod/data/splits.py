"""Semi-supervised split files (labeled fold@percent + unlabeled rest) from a COCO json.

For an input ``<dir>/<name>.json`` (e.g. ``instances_train2017.json``) :func:`make_split`
writes two COCO files into ``out_dir``:

- ``<name>.{fold}@{percent}.json``: the labeled images and their annotations;
- ``<name>.{fold}@{percent}-unlabeled.json``: every other image. It KEEPS its
  annotations: they are the hidden ground truth used only to measure pseudo-label
  quality; training must never read them.

Both keep the input's ``categories``, ``info`` and ``licenses`` (when present) and the
input's image and annotation order. ``{percent}`` is written as ``10`` for 10.0 and
``0.5`` for 0.5 (SoftTeacher writes ``int(percent)``, so its 0.5% files are named ``@0``).

Two selection modes, both over positions ``0..N-1`` in the json's ``images`` order:

- default (``reference_offset=None``): ``k = int(percent * N / 100)`` images, at least 1
  (multiplying first keeps 29% of 100 at 29; ``29 / 100 * 100`` is 28.999...). The
  generator is ``numpy.random.default_rng(SeedSequence([seed, fold, round(percent *
  1000)]))``; it draws one float per image and the ``k`` smallest are labeled (stable
  argsort). NumPy freezes bit-generator streams but not ``Generator.choice``'s algorithm,
  so drawing raw floats keeps the split the same across NumPy versions.
- reference (``reference_offset=O``): microsoft/SoftTeacher
  ``tools/dataset/semi_coco.py`` (read at commit 65d1cfc). It calls the legacy global
  ``np.random.seed(seed + seed_offset)``, where its ``seed`` is the fold (1..5 in its
  scripts) and ``seed_offset`` defaults to 0 (the shell script passes a random one),
  computes ``labeled_tot = int(percent / 100.0 * len(images))`` and draws
  ``np.random.choice(range(len(images)), size=labeled_tot, replace=False)``: positions
  in the json's image order, not image ids. Annotations whose ``image_id`` is labeled go
  to the labeled file, all others to the unlabeled file. We use a local
  ``np.random.RandomState(fold + offset)``, which yields the same numbers without touching
  the global RNG. ``seed`` plays no part in this mode.

Unlike the reference, annotations pointing at an unknown image id and duplicate image
ids are errors here (the reference silently files such annotations as unlabeled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ssod.io import write_json_atomic

__all__ = [
    "load_coco_json",
    "make_split",
    "percent_tag",
    "select_labeled_indices",
    "split_paths",
]


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read a COCO json file; raise a ``ValueError`` or ``FileNotFoundError`` naming it.

    Returns the parsed top-level dict; requires an ``images`` list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO json file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: file is empty, expected a COCO json object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: malformed json at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is a {type(data).__name__}, expected an object")
    if not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: missing or non-list 'images'")
    return data


def percent_tag(percent: float) -> str:
    """File-name form of a percent: ``10.0 -> "10"``, ``0.5 -> "0.5"``."""
    return str(int(percent)) if float(percent).is_integer() else f"{percent:g}"


def split_paths(coco_json: Path, out_dir: Path, fold: int, percent: float) -> tuple[Path, Path]:
    """The (labeled, unlabeled) file paths that :func:`make_split` writes."""
    stem = f"{Path(coco_json).stem}.{fold}@{percent_tag(percent)}"
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}-unlabeled.json"


def _check_arguments(num_images: int, fold: int, percent: float, seed: int) -> None:
    if num_images < 1:
        raise ValueError(f"need at least one image to split, got {num_images}")
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if fold < 0 or seed < 0:
        raise ValueError(f"fold and seed must be non-negative, got fold={fold} seed={seed}")


def select_labeled_indices(
    num_images: int,
    fold: int,
    percent: float,
    seed: int = 0,
    reference_offset: int | None = None,
) -> np.ndarray:
    """Positions (into the json's ``images`` list) of the labeled images.

    Returns a sorted int64 array of unique positions in ``[0, num_images)``. See the module
    docstring for both seed schemes. Pure: no global RNG state is read or changed.
    """
    _check_arguments(num_images, fold, percent, seed)
    if reference_offset is not None:
        if seed != 0:
            raise ValueError("seed is not used in reference mode (the fold seeds it); leave it 0")
        count = int(percent / 100.0 * num_images)
        if count < 1:
            raise ValueError(
                f"reference mode selects int({percent} / 100 * {num_images}) = 0 images"
            )
        state = np.random.RandomState(fold + reference_offset)
        chosen = state.choice(range(num_images), size=count, replace=False)
    else:
        count = max(1, int(percent * num_images / 100))
        sequence = np.random.SeedSequence([seed, fold, round(percent * 1000)])
        draws = np.random.default_rng(sequence).random(num_images)
        chosen = np.argsort(draws, kind="stable")[:count]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _first_duplicate(values: list) -> Any:
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _partition(
    data: dict[str, Any], labeled_positions: np.ndarray, source: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    images = data["images"]
    image_ids = [image.get("id") if isinstance(image, dict) else None for image in images]
    if None in image_ids:
        raise ValueError(f"{source}: image at position {image_ids.index(None)} has no 'id'")
    duplicate = _first_duplicate(image_ids)
    if duplicate is not None:
        raise ValueError(f"{source}: duplicate image id {duplicate}")
    labeled_ids = {image_ids[i] for i in labeled_positions.tolist()}
    known_ids = set(image_ids)
    labeled_annotations, unlabeled_annotations = [], []
    for position, annotation in enumerate(data.get("annotations", [])):
        if not isinstance(annotation, dict):
            raise ValueError(f"{source}: annotation at position {position} is not an object")
        if annotation.get("image_id") not in known_ids:
            raise ValueError(
                f"{source}: annotation id {annotation.get('id')} points at unknown image id "
                f"{annotation.get('image_id')}"
            )
        if annotation["image_id"] in labeled_ids:
            labeled_annotations.append(annotation)
        else:
            unlabeled_annotations.append(annotation)
    kept = {key: data[key] for key in ("info", "licenses") if key in data}
    labeled = {**kept, "images": [images[i] for i in labeled_positions.tolist()]}
    unlabeled = {**kept, "images": [im for im in images if im["id"] not in labeled_ids]}
    labeled["annotations"] = labeled_annotations
    unlabeled["annotations"] = unlabeled_annotations
    if "categories" in data:
        labeled["categories"] = unlabeled["categories"] = data["categories"]
    return labeled, unlabeled


def scheme_name(seed: int, reference_offset: int | None) -> str:
    """The folder of one selection scheme's splits: ``seed-<seed>`` or ``reference-<offset>``
    (another seed's files never land on this one's)."""
    return f"seed-{seed}" if reference_offset is None else f"reference-{reference_offset}"


def make_split(
    coco_json: Path,
    out_dir: Path,
    fold: int,
    percent: float,
    seed: int = 0,
    reference_offset: int | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.{fold}@{percent}.json`` and ``<name>.{fold}@{percent}-unlabeled.json``.

    ``coco_json``: a COCO file (bboxes xywh; not inspected here). ``reference_offset``:
    None for the default seed scheme, an int for SoftTeacher's (module docstring).
    Returns (labeled_path, unlabeled_path). Same arguments give byte-identical files.
    """
    coco_json = Path(coco_json)
    data = load_coco_json(coco_json)
    positions = select_labeled_indices(len(data["images"]), fold, percent, seed, reference_offset)
    labeled, unlabeled = _partition(data, positions, coco_json)
    # How the files were made, in each file's own ``info`` block (the source's info kept).
    record = {"source": coco_json.name, "fold": fold, "percent": percent, "labeled_images": len(positions),
              "mode": "seed" if reference_offset is None else "reference",
              "seed": seed if reference_offset is None else None, "reference_offset": reference_offset}
    for part, role in ((labeled, "labeled"), (unlabeled, "unlabeled")):
        info = part.get("info") if isinstance(part.get("info"), dict) else {}
        part["info"] = {**info, "ssod_split": {**record, "role": role}}
    labeled_path, unlabeled_path = split_paths(coco_json, out_dir, fold, percent)
    write_json_atomic(labeled, labeled_path)
    write_json_atomic(unlabeled, unlabeled_path)
    return labeled_path, unlabeled_path
