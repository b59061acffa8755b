"""The built-in synthetic detection dataset: simple shapes on cluttered, noisy backgrounds.

It is the project's embedded default: no download, no GPU. `ensure_synthetic` draws it
deterministically from a `SyntheticRecipe` on first use into a cache directory
(`ssod.data.cache.default_cache_dir()`: `$SSOD_CACHE_DIR` or `~/.cache/ssod`) as JPEG files plus COCO json:

    <cache>/synthetic-<hash>/train/000001.jpg ...      annotations/train.json
    <cache>/synthetic-<hash>/val/000001.jpg ...        annotations/val.json
    <cache>/synthetic-<hash>/test/000001.jpg ...       annotations/test.json (num_test > 0)

`<hash>` is a short hash of the recipe and of `GENERATOR_VERSION`, so a changed recipe or
changed drawing code gets a fresh directory instead of a stale one.

Default recipe (`SyntheticRecipe()`):

- 1200 train and 200 val images (5% of train = 60 labeled images), seed 0. Every image
  has its own random stream `(seed, split, index)`, so images do not depend on each other.
- Image sides drawn independently in 128-192 px.
- Background: a random mean colour, a smooth random colour field, a medium-frequency
  texture, and Gaussian pixel noise (std 6) over everything, objects included.
- Clutter, 3-10 items per image, drawn under the objects: straight lines, elongated
  ellipses, open arcs (look like parts of rings), small dots (look like tiny circles).
- 1-6 objects per image; box side (geometric mean of width and height) log-uniform in
  10-60 px, aspect ratio jitter up to 1.25; two boxes may share at most 30% of the
  smaller one (intersection over the smaller area). Objects are anti-aliased, colours
  random and independent of the class, with a minimum contrast to the background.
- 10 classes, ids 1..10 in this order: circle, ring, hexagon, square, rounded_square,
  hollow_square, triangle, star, cross, x_cross. Look-alike groups: circle / ring (thick
  outline) / hexagon; square / rounded_square (slightly rounded corners) / hollow_square;
  cross / x_cross (the same plus sign turned 45 degrees); star / triangle by outline.
  `num_classes` < 10 keeps the first `num_classes` of this list.

Annotations: `bbox` is COCO xywh in absolute pixels and is exact, the tight box of the
drawn polygon (two decimals); every box lies inside its image. `area` is the shape's own
polygon area (holes removed, occlusion ignored), `iscrowd` 0, categories carry names.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssod.data.cache import build_once

# Bump when the drawing code changes, so caches written by older code are not reused.
GENERATOR_VERSION = 1

CLASS_NAMES = (
    "circle", "ring", "hexagon", "square", "rounded_square",
    "hollow_square", "triangle", "star", "cross", "x_cross",
)
# (base rotation, +- jitter) in degrees; 180 jitter means any orientation.
_ROTATION = {
    "circle": (0.0, 180.0), "ring": (0.0, 180.0), "hexagon": (0.0, 180.0),
    "square": (0.0, 6.0), "rounded_square": (0.0, 6.0), "hollow_square": (0.0, 6.0),
    "triangle": (0.0, 10.0), "star": (0.0, 180.0), "cross": (0.0, 6.0), "x_cross": (45.0, 6.0),
}
_SUPERSAMPLE = 4
_MIN_CONTRAST = 80.0
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SyntheticRecipe:
    """Everything that determines the dataset; ranges are inclusive (min, max)."""

    seed: int = 0
    num_train: int = 1200
    num_val: int = 200
    # A held-out test split (its own random streams): for reporting only, never for tuning.
    num_test: int = 0
    image_size: tuple[int, int] = (128, 192)
    objects_per_image: tuple[int, int] = (1, 6)
    object_size: tuple[float, float] = (10.0, 60.0)
    max_aspect: float = 1.25
    num_classes: int = 10
    clutter_per_image: tuple[int, int] = (3, 10)
    max_overlap: float = 0.3
    noise_std: float = 6.0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Normalise types so that a YAML list or an int where a float belongs hashes the same.
        for field in fields(self):
            value = getattr(self, field.name)
            cast = float if "float" in str(field.type) else int
            value = tuple(cast(v) for v in value) if "tuple" in str(field.type) else cast(value)
            object.__setattr__(self, field.name, value)
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {self.num_classes}")
        for name in ("image_size", "objects_per_image", "object_size", "clutter_per_image"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= min <= max, got {(low, high)}")
        if self.objects_per_image[0] < 1 or self.object_size[1] > self.image_size[0]:
            raise ValueError("need >= 1 object per image and objects no larger than the image")
        if self.object_size[0] <= 0 or self.max_aspect < 1.0:
            raise ValueError("object_size must be positive and max_aspect >= 1")

    def fingerprint(self) -> str:
        """Short hash of the recipe and the generator version (names the cache directory)."""
        recipe = asdict(self)
        if not recipe["num_test"]:
            del recipe["num_test"]  # the same files as before test splits existed: the same name
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **recipe}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives; image `file_name`s in the json are relative to the image dirs."""

    root: Path
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    test_json: Path  # present when the recipe has num_test > 0
    test_images: Path

    @classmethod
    def under(cls, root: Path) -> SyntheticPaths:
        return cls(root, root / "annotations/train.json", root / "train",
                   root / "annotations/val.json", root / "val",
                   root / "annotations/test.json", root / "test")


def ensure_synthetic(cache_dir: Path, recipe: SyntheticRecipe = SyntheticRecipe()) -> SyntheticPaths:
    """Return the dataset for `recipe` under `cache_dir`, generating it first if absent.

    Safe for concurrent callers and for a killed builder (`ssod.data.cache.build_once`).
    """
    target = Path(cache_dir) / f"synthetic-{recipe.fingerprint()}"
    build_once(target, lambda building: _build_dataset(building, recipe))
    return SyntheticPaths.under(target)


def _build_dataset(root: Path, recipe: SyntheticRecipe) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    for split_index, split in enumerate(_SPLITS):
        count = {"train": recipe.num_train, "val": recipe.num_val, "test": recipe.num_test}[split]
        if split == "test" and not count:
            continue
        _write_split(root, split, split_index, count, recipe)


def _write_split(root: Path, split: str, split_index: int, count: int, recipe: SyntheticRecipe) -> None:
    image_dir = root / split
    image_dir.mkdir()
    images, annotations = [], []
    for image_id in range(1, count + 1):
        rng = np.random.default_rng([recipe.seed, split_index, image_id])
        picture, objects = _draw_image(rng, recipe)
        file_name = f"{image_id:06d}.jpg"
        picture.save(image_dir / file_name, quality=recipe.jpeg_quality, subsampling=0)
        images.append({"id": image_id, "file_name": file_name,
                       "width": picture.width, "height": picture.height})
        for label, (x0, y0, width, height), area in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                "bbox": [x0, y0, width, height], "area": area, "iscrowd": 0,
            })
    categories = [{"id": index + 1, "name": name, "supercategory": "shape"}
                  for index, name in enumerate(CLASS_NAMES[: recipe.num_classes])]
    dataset = {
        "info": {"description": f"ssod synthetic shapes, {split}", "version": str(GENERATOR_VERSION),
                 "recipe": asdict(recipe)},
        "licenses": [], "images": images, "annotations": annotations, "categories": categories,
    }
    (root / "annotations" / f"{split}.json").write_text(json.dumps(dataset))


def _draw_image(rng: np.random.Generator, recipe: SyntheticRecipe):
    """One image and its objects as `(category_id, (x, y, w, h), area)`, xywh absolute pixels."""
    width, height = (int(v) for v in rng.integers(*recipe.image_size, endpoint=True, size=2))
    picture = _background(rng, width, height)
    _draw_clutter(rng, picture, recipe)
    canvas = np.asarray(picture, dtype=np.float32).copy()
    objects = []
    for box in _place_boxes(rng, recipe, width, height):
        label = int(rng.integers(1, recipe.num_classes, endpoint=True))
        polygons = _shape_in_box(rng, CLASS_NAMES[label - 1], box)
        _paint(rng, canvas, polygons)
        area = sum(-_polygon_area(p) if hole else _polygon_area(p) for p, hole in polygons)
        objects.append((label, box, round(area, 2)))
    canvas += rng.normal(0.0, recipe.noise_std, canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), objects


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    mean = rng.uniform(40, 215, size=3)
    grid_shape = (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)
    grid = rng.integers(0, 256, size=grid_shape, dtype=np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture_grid = rng.normal(0, 12, size=(max(2, height // 6), max(2, width // 6))).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture_grid).resize((width, height), Image.BILINEAR))
    pixels = mean + (field - 128.0) * rng.uniform(0.2, 0.5) + texture[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_clutter(rng: np.random.Generator, picture: Image.Image, recipe: SyntheticRecipe) -> None:
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for _ in range(int(rng.integers(*recipe.clutter_per_image, endpoint=True))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.choice(4, p=[0.35, 0.25, 0.25, 0.15])
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if kind == 0:  # line
            angle, length = rng.uniform(0, math.pi), rng.uniform(15, max(width, height))
            dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:  # elongated blob: never round, so never a circle
            length = rng.uniform(8, 35)
            axes = np.array([length, length / rng.uniform(2.5, 5.0)])
            blob = _rotate(_regular(32) * axes, rng.uniform(0, 180)) + (cx, cy)
            draw.polygon([tuple(p) for p in blob], fill=colour)
        elif kind == 2:  # open arc: a hard negative for rings
            radius = rng.uniform(5, 30)
            start = rng.uniform(0, 360)
            draw.arc([cx - radius, cy - radius, cx + radius, cy + radius], start,
                     start + rng.uniform(60, 260), fill=colour, width=int(rng.integers(1, 4)))
        else:  # dot: smaller than the smallest object
            radius = rng.uniform(1.5, 3.0)
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)


def _place_boxes(rng: np.random.Generator, recipe: SyntheticRecipe, width: int, height: int):
    """Boxes `(x, y, w, h)` with two decimals, inside the image, with limited mutual overlap."""
    boxes: list[tuple[float, float, float, float]] = []
    log_low, log_high = (math.log(s) for s in recipe.object_size)
    for _ in range(int(rng.integers(*recipe.objects_per_image, endpoint=True))):
        for _attempt in range(20):
            side = math.exp(rng.uniform(log_low, log_high))
            aspect = math.exp(rng.uniform(-1.0, 1.0) * math.log(recipe.max_aspect))
            box_w = min(round(side * math.sqrt(aspect), 2), float(width))
            box_h = min(round(side / math.sqrt(aspect), 2), float(height))
            box = (round(rng.uniform(0, width - box_w), 2), round(rng.uniform(0, height - box_h), 2),
                   box_w, box_h)
            if all(_overlap(box, other) <= recipe.max_overlap for other in boxes):
                boxes.append(box)
                break
    return boxes


def _overlap(a, b) -> float:
    """Intersection over the smaller area of two xywh boxes."""
    inter_w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    inter_h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    return inter_w * inter_h / min(a[2] * a[3], b[2] * b[3])


def _regular(vertices: int, radius: float = 0.5, inner: float | None = None) -> np.ndarray:
    """A regular polygon, or a star when `inner` (radius of the inner vertices) is given."""
    count = vertices * (2 if inner is not None else 1)
    angles = -math.pi / 2 + np.arange(count) * 2 * math.pi / count
    radii = np.full(count, radius)
    if inner is not None:
        radii[1::2] = inner
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return points @ np.array([[c, s], [-s, c]])


def _rounded_square(corner: float) -> np.ndarray:
    arcs = []
    for cx, cy, start in ((0.5, 0.5, 0), (-0.5, 0.5, 90), (-0.5, -0.5, 180), (0.5, -0.5, 270)):
        angles = np.radians(start + np.linspace(0, 90, 6))
        arcs.append(np.stack([cx - math.copysign(corner, cx) + corner * np.cos(angles),
                              cy - math.copysign(corner, cy) + corner * np.sin(angles)], axis=1))
    return np.concatenate(arcs)


def _plus(half_width: float) -> np.ndarray:
    a, b = half_width, 0.5
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                     (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _unit_shape(rng: np.random.Generator, name: str) -> list[tuple[np.ndarray, bool]]:
    """Polygons `(points [P, 2], is_hole)` of one shape around the origin; the first is the outline."""
    square = np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)])
    if name == "circle":
        return [(_regular(48), False)]
    if name == "ring":
        return [(_regular(48), False), (_regular(48, 0.5 * (1 - rng.uniform(0.3, 0.45))), True)]
    if name == "hexagon":
        return [(_regular(6), False)]
    if name == "square":
        return [(square, False)]
    if name == "rounded_square":
        return [(_rounded_square(rng.uniform(0.1, 0.2)), False)]
    if name == "hollow_square":
        return [(square, False), (square * (1 - 2 * rng.uniform(0.15, 0.25)), True)]
    if name == "triangle":
        return [(np.array([(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]), False)]
    if name == "star":
        return [(_regular(5, 0.5, rng.uniform(0.19, 0.25)), False)]
    if name in ("cross", "x_cross"):
        return [(_plus(rng.uniform(0.13, 0.2)), False)]
    raise ValueError(f"unknown shape {name!r}")


def _shape_in_box(rng: np.random.Generator, name: str, box) -> list[tuple[np.ndarray, bool]]:
    """Rotate the unit shape, then stretch it so its outline's tight box is exactly `box` (xywh)."""
    base, jitter = _ROTATION[name]
    degrees = base + rng.uniform(-jitter, jitter)
    polygons = [(_rotate(points, degrees), hole) for points, hole in _unit_shape(rng, name)]
    outline = polygons[0][0]
    low, high = outline.min(axis=0), outline.max(axis=0)
    scale = np.array(box[2:]) / (high - low)
    return [((points - low) * scale + np.array(box[:2]), hole) for points, hole in polygons]


def _paint(rng: np.random.Generator, canvas: np.ndarray, polygons) -> None:
    """Composite one anti-aliased shape of a contrasting random colour into `canvas` [H, W, 3]."""
    outline = polygons[0][0]
    x0, y0 = (int(v) for v in np.floor(outline.min(axis=0)))
    x1, y1 = (int(v) for v in np.ceil(outline.max(axis=0)))
    region = canvas[y0:y1, x0:x1]
    mask = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for points, hole in polygons:
        # Supersampled pixel k covers [k, k + 1), so its centre sits at k + 0.5.
        local = (points - (x0, y0)) * _SUPERSAMPLE - 0.5
        draw.polygon([tuple(p) for p in local], fill=0 if hole else 255)
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32)[..., None] / 255.0
    background = region.reshape(-1, 3).mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(30):
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, size=3)
    region[:] = region * (1.0 - alpha) + colour * alpha


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
