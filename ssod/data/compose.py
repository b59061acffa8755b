"""Pasting masked cut-outs onto a picture: a background crop, placement under a visibility
rule, compositing, and the boxes of what stays visible.

Layers are numbered 1..N in pasting order; an ``owner`` map [H, W] int says which layer
each pixel shows (0: the background), a later layer over the earlier ones. Boxes are
COCO xywh in whole pixels: ``(x0, y0, x1 - x0, y1 - y0)`` with ``x1`` one past the last
visible column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ssod.data.instances import Backdrop, Cutout

# Mask edges are softened this much (Gaussian sigma, pixels) when pasted, so that an object
# does not stand out by a jagged outline alone.
EDGE_SOFTNESS = 0.7


@dataclass(frozen=True)
class Layer:
    """A pasted object: ``pixels`` [h, w, 3] uint8 and ``mask`` [h, w] bool at top-left
    ``(x, y)`` in image pixels, which may be negative or reach past the border."""

    pixels: np.ndarray
    mask: np.ndarray
    x: int
    y: int

    def window(self, height: int, width: int) -> tuple[slice, slice, slice, slice]:
        """(image rows, image columns, layer rows, layer columns) of the part inside the image."""
        h, w = self.mask.shape
        y0, x0 = max(self.y, 0), max(self.x, 0)
        y1, x1 = min(self.y + h, height), min(self.x + w, width)
        y1, x1 = max(y1, y0), max(x1, x0)
        return (slice(y0, y1), slice(x0, x1), slice(y0 - self.y, y1 - self.y), slice(x0 - self.x, x1 - self.x))


def scaled(cutout: Cutout, side: float, max_upscale: float, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cut-out resized so that the square root of its box area is ``side`` (at most
    ``max_upscale`` times its own size): (pixels [h, w, 3] uint8, mask [h, w] bool)."""
    height, width = cutout.mask.shape
    scale = min(side / math.sqrt(width * height), max_upscale)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pixels = np.asarray(Image.fromarray(cutout.pixels).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(cutout.mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) > 127
    if mirror:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(pixels), np.ascontiguousarray(mask)


def stamp(owner: np.ndarray, layer: Layer, number: int) -> None:
    """Mark the layer's mask pixels inside the image as shown by layer ``number``."""
    rows, columns, layer_rows, layer_columns = layer.window(*owner.shape)
    owner[rows, columns][layer.mask[layer_rows, layer_columns]] = number


def visible_fractions(owner: np.ndarray, layers: list[Layer]) -> np.ndarray:
    """[N] float: the part of each layer's whole mask (outside the image included) that ``owner`` shows."""
    shown = np.bincount(owner.ravel(), minlength=len(layers) + 1)[1:len(layers) + 1]
    return shown / np.array([layer.mask.sum() for layer in layers], dtype=np.float64)


def place(rng: np.random.Generator, owner: np.ndarray, layers: list[Layer], pixels: np.ndarray, mask: np.ndarray,
          min_visible: float, tries: int = 10) -> Layer | None:
    """Put a new layer on top, up to half of it outside the image, at the first of ``tries``
    random places where every layer keeps ``min_visible`` of its mask in view; update
    ``owner`` and return the layer, or return None (``owner`` unchanged)."""
    if not mask.any():
        return None
    height, width = owner.shape
    layer_height, layer_width = mask.shape
    for _ in range(tries):
        x = int(rng.integers(-(layer_width // 2), width - (layer_width + 1) // 2, endpoint=True))
        y = int(rng.integers(-(layer_height // 2), height - (layer_height + 1) // 2, endpoint=True))
        layer = Layer(pixels, mask, x, y)
        trial = owner.copy()
        stamp(trial, layer, len(layers) + 1)
        if (visible_fractions(trial, [*layers, layer]) >= min_visible).all():
            owner[:] = trial
            return layer
    return None


def visible_box(owner: np.ndarray, number: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """(xywh tight box, mask [H, W] bool) of what layer ``number`` shows; it must show something."""
    visible = owner == number
    rows, columns = np.nonzero(visible)
    x0, y0 = int(columns.min()), int(rows.min())
    return (x0, y0, int(columns.max()) + 1 - x0, int(rows.max()) + 1 - y0), visible


def composite(canvas: np.ndarray, layers: list[Layer]) -> None:
    """Paint the layers in order into ``canvas`` [H, W, 3] float, each through its softened mask."""
    height, width = canvas.shape[:2]
    for layer in layers:
        rows, columns, layer_rows, layer_columns = layer.window(height, width)
        soft = Image.fromarray(layer.mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(EDGE_SOFTNESS))
        alpha = (np.asarray(soft, dtype=np.float32) / 255.0)[layer_rows, layer_columns, None]
        region = canvas[rows, columns]
        region[:] = region * (1.0 - alpha) + layer.pixels[layer_rows, layer_columns] * alpha


def background(rng: np.random.Generator, backdrops: list[Backdrop], width: int, height: int,
               tries: int, max_objects: float) -> tuple[np.ndarray, int]:
    """A crop of a backdrop, zoomed by 0.75-2.5 as far as the photograph allows, maybe mirrored,
    resized to [height, width, 3] float32; the first of ``tries`` crops with at most
    ``max_objects`` of its pixels on a kept-class annotation, else the one with the fewest.
    Returns (pixels, the backdrop's source image id)."""
    best = None
    for _ in range(tries):
        backdrop = backdrops[int(rng.integers(len(backdrops)))]
        photo_height, photo_width = backdrop.objects.shape
        largest = min(2.5, photo_width / width, photo_height / height)
        zoom = math.exp(rng.uniform(math.log(min(0.75, largest)), math.log(largest)))
        crop_width, crop_height = min(photo_width, round(width * zoom)), min(photo_height, round(height * zoom))
        x = int(rng.integers(0, photo_width - crop_width, endpoint=True))
        y = int(rng.integers(0, photo_height - crop_height, endpoint=True))
        covered = backdrop.objects[y:y + crop_height, x:x + crop_width].mean()
        if best is None or covered < best[0]:
            best = (covered, backdrop, (x, y, x + crop_width, y + crop_height))
        if covered <= max_objects:
            break
    _, backdrop, crop = best
    picture = Image.fromarray(backdrop.pixels).crop(crop).resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(picture, dtype=np.float32).copy(), backdrop.image_id
