"""COCO-format json -> images and torchvision targets.

Contract (torchvision's): an image is a float tensor [3, H, W] in 0..1; a target is a dict
with ``boxes`` [N, 4] float32 xyxy absolute pixels and ``labels`` [N] int64 contiguous
1..C (0 is background). COCO's category ids have gaps, so ``CategoryMap`` maps them to
labels and back explicitly.

Datasets are indexed by ``(index, seed)`` pairs from ``ssod.data.sampling``: the seed
drives the augmentation of that one sample, so a stream of batches is reproducible
whatever the number of DataLoader workers, and after a resume.

Faults: a missing or malformed json, an empty ``images`` list or an unknown category id
is an error at start naming the file. A corrupt image met while training is skipped (the
next image is used instead) and reported in the sample's ``bad_files`` so the loop can
count and log it; so is an image whose file is not the size the json gives (its boxes would
not line up). Boxes that reach past the image's border are cut to it and counted at start
(``clipped_boxes``), those left with no area dropped and counted (``degenerate_boxes``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

# Errors Pillow raises for truncated, corrupt or unsupported files.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_SKIPS = 16


class DatasetError(ValueError):
    """A dataset file is missing or wrong; the message names the file and the problem."""


def load_coco(json_path: str | Path) -> COCO:
    """Load a COCO json with pycocotools, with clear errors for the usual faults."""
    path = Path(json_path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: no '{key}' list")
    if not data["images"]:
        raise DatasetError(f"{path}: the 'images' list is empty")
    data.setdefault("annotations", [])
    # pycocotools keeps the last of two images with one id: one image's boxes would then be
    # paired with another file. Refused here, as ``ssod-data check`` does.
    seen, duplicates = set(), []
    for image in data["images"]:
        image_id = image.get("id") if isinstance(image, dict) else None
        if image_id in seen:
            duplicates.append(image_id)
        seen.add(image_id)
    if duplicates:
        raise DatasetError(f"{path}: duplicate image ids {sorted(set(duplicates), key=str)[:10]} "
                           f"({len(duplicates)} repeated entries); each image needs its own id")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    coco.source_path = str(path)
    unknown = {a["category_id"] for a in data["annotations"]} - set(coco.cats)
    if unknown:
        raise DatasetError(f"{path}: annotations use category ids {sorted(unknown)} not in 'categories'")
    missing = {a["image_id"] for a in data["annotations"]} - set(coco.imgs)
    if missing:
        raise DatasetError(f"{path}: annotations point at unknown image ids {sorted(missing)[:10]}")
    return coco


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous labels 1..C, in ascending id order."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: COCO) -> "CategoryMap":
        cats = sorted(coco.cats.values(), key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return {label: cat for label, cat in enumerate(self.category_ids, start=1)}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {cat: label for label, cat in enumerate(self.category_ids, start=1)}

    def check_same(self, other: "CategoryMap", path: str) -> None:
        """Every split must share one label space, or labels silently mean other classes."""
        if other != self:
            raise DatasetError(f"{path}: its categories differ from the labeled set's categories")


def annotations_to_target(anns: list[dict], category_map: CategoryMap, width: int, height: int) -> tuple[dict, int]:
    """COCO annotations of one image -> (target, number of degenerate boxes dropped).

    Crowd boxes are ignored, and so are VOC's ``difficult`` objects (and annotations
    marked ``ignore``, as mmdetection's VOC converter marks them): the reference trains on
    neither, while COCOeval still counts difficult ones as ground truth. Boxes are clipped
    to the image; boxes with zero or negative width or height after clipping (or
    non-finite numbers) are dropped and counted.
    """
    to_label = category_map.category_id_to_label
    anns = [a for a in anns if not (a.get("iscrowd", 0) or a.get("difficult", 0) or a.get("ignore", 0))]
    if not anns:
        return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}, 0
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    labels = torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    keep = torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": labels[keep]}, int((~keep).sum())


class ImageSizeMismatch(ValueError):
    """An image file whose size is not the json's width x height (an ``IMAGE_ERRORS``: skipped
    and counted like an unreadable file)."""


# How far past the border a box may reach before it counts as clipped (COCO's own boxes
# overshoot by rounding).
CLIP_TOLERANCE_PX = 1.0


def box_counts(coco: COCO, image_ids: list[int]) -> tuple[int, int, int]:
    """(usable boxes, degenerate boxes, clipped boxes) of ``image_ids``, by the rules of
    ``annotations_to_target``, with the image sizes the json gives (known before any image
    is read; images without a size count their boxes as usable, none as clipped). Clipped:
    usable boxes that reach more than ``CLIP_TOLERANCE_PX`` past the border and are cut to it."""
    rows, sizes = [], []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        size = (info.get("width") or float("inf"), info.get("height") or float("inf"))
        for a in coco.imgToAnns.get(image_id, []):
            if not (a.get("iscrowd", 0) or a.get("difficult", 0) or a.get("ignore", 0)):
                rows.append(a["bbox"])
                sizes.append(size)
    if not rows:
        return 0, 0, 0
    xywh, limits = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4), torch.tensor(sizes, dtype=torch.float64)
    x1, y1 = xywh[:, 0].clamp(min=0), xywh[:, 1].clamp(min=0)
    x2 = torch.minimum(xywh[:, 0] + xywh[:, 2], limits[:, 0])
    y2 = torch.minimum(xywh[:, 1] + xywh[:, 3], limits[:, 1])
    keep = torch.isfinite(xywh).all(dim=1) & (x2 > x1) & (y2 > y1)
    over = torch.stack([-xywh[:, 0], -xywh[:, 1], xywh[:, 0] + xywh[:, 2] - limits[:, 0],
                        xywh[:, 1] + xywh[:, 3] - limits[:, 1]], dim=1).amax(dim=1)
    clipped = keep & (over > CLIP_TOLERANCE_PX)
    return int(keep.sum()), int((~keep).sum()), int(clipped.sum())


def read_rgb(path: Path) -> torch.Tensor:
    """Decode an image fully (truncation raises here, not later) -> uint8 [3, H, W] RGB."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "I;16" or image.mode == "I":
            # 16-bit greyscale: scale to 8 bits rather than let Pillow clip at 255.
            image = image.point(lambda value: value * (1 / 256)).convert("L")
        return F.pil_to_tensor(image.convert("RGB"))


class CocoDetection(Dataset):
    """Images and boxes of one COCO json.

    ``view(image uint8 [3,H,W], target, generator) -> item`` turns a decoded sample into
    what a training or evaluation batch needs. Items are looked up with ``(index, seed)``.
    The returned item is ``(view output, meta)`` where ``meta`` has ``image_id``,
    ``size`` (h, w) and ``bad_files`` (paths skipped because they could not be read).
    """

    def __init__(
        self,
        coco: COCO,
        image_dir: str | Path,
        category_map: CategoryMap,
        view: Callable,
        keep_images_without_annotations: bool = True,
    ) -> None:
        self.coco = coco
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image directory not found (for {coco.source_path})")
        self.category_map = category_map
        self.view = view
        ids = sorted(coco.imgs)
        if not keep_images_without_annotations:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, []))]
        if not ids:
            raise DatasetError(f"{coco.source_path}: no images left after dropping images without annotations")
        self.image_ids = ids
        self.degenerate_dropped = 0
        # Known at start from the json: logged by training (data/<set>/boxes, .../degenerate_boxes).
        self.box_count, self.degenerate_boxes, self.clipped_boxes = box_counts(coco, ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def keep_first(self, count: int) -> None:
        """Only the first ``count`` images (``data.val_max_images``), their boxes recounted."""
        self.image_ids = self.image_ids[:count]
        self.box_count, self.degenerate_boxes, self.clipped_boxes = box_counts(self.coco, self.image_ids)

    def load(self, index: int) -> tuple[torch.Tensor, dict, dict]:
        """Decode image ``index`` -> (uint8 [3,H,W], target, meta); raises on a bad file."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        height, width = image.shape[-2:]
        declared = (info.get("width"), info.get("height"))
        if all(isinstance(v, (int, float)) and v > 0 for v in declared) and (width, height) != declared:
            raise ImageSizeMismatch(f"the file is {width}x{height} but {self.coco.source_path} says "
                                    f"{declared[0]}x{declared[1]} (width x height): its boxes would not line up")
        target, dropped = annotations_to_target(self.coco.imgToAnns.get(image_id, []), self.category_map, width, height)
        self.degenerate_dropped += dropped
        target["image_id"] = image_id
        meta = {"image_id": image_id, "size": (height, width), "path": str(path)}
        return image, target, meta

    def __getitem__(self, key: tuple[int, int] | int):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        bad_files: list[str] = []
        bad_ids: list[int] = []
        for attempt in range(MAX_SKIPS):
            position = (index + attempt) % len(self)
            try:
                image, target, meta = self.load(position)
                break
            except IMAGE_ERRORS as error:
                path = self.image_dir / self.coco.imgs[self.image_ids[position]]["file_name"]
                log.warning("skipping unreadable image %s: %s", path, error)
                bad_files.append(f"{path}: {error}")
                bad_ids.append(int(self.image_ids[position]))
        else:
            raise DatasetError(f"{self.image_dir}: {MAX_SKIPS} unreadable images in a row: {bad_files}")
        meta["bad_files"], meta["bad_image_ids"] = bad_files, bad_ids
        generator = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            # Transforms draw from torch's global RNG; seeding a forked copy makes each
            # sample reproducible without disturbing the trainer's own RNG. The CPU
            # generator only: torch.manual_seed would also reseed the GPU's, which
            # fork_rng(devices=[]) does not restore (and it costs 0.09 ms a sample).
            torch.default_generator.manual_seed(int(seed))
            return self.view(image, target, generator), meta


def list_collate(batch: list) -> tuple[list, list[dict]]:
    """Keep samples as lists: detection images differ in size."""
    return [item for item, _ in batch], [meta for _, meta in batch]


def load_split(
    json_path: str | Path, image_dir: str | Path, category_map: Optional[CategoryMap], view: Callable, keep_empty: bool = True
) -> CocoDetection:
    """Load one json as a dataset, checking it shares ``category_map`` when one is given."""
    coco = load_coco(json_path)
    found = CategoryMap.from_coco(coco)
    if category_map is None:
        category_map = found
    else:
        category_map.check_same(found, str(json_path))
    return CocoDetection(coco, image_dir, category_map, view, keep_empty)
