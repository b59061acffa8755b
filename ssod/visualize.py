"""Pictures: ground truth, raw and polished pseudo labels side by side (for MLflow), and an
image with its detections, a colour per class (``ssod-predict --draw``)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


# A panel's longer side is enlarged by a whole factor to at least this many pixels (pixels
# kept sharp): a weak view of a small image (the synthetic set's are about 110 px) would
# show boxes and labels too small to read.
PANEL_SIZE = 480
TITLE_HEIGHT = 28


def panel_scale(height: int, width: int) -> int:
    """The whole factor a ``height`` x ``width`` panel is enlarged by (1 when large enough)."""
    return max(1, math.ceil(PANEL_SIZE / max(height, width, 1)))


def _panel(image: Tensor, boxes: Tensor, labels: list[str], colour: tuple[int, int, int], scale: int) -> Image.Image:
    canvas = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
    canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    panel = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=max(12, min(panel.size) // 32))
    line = max(2, min(panel.size) // 240)
    for box, label in zip((boxes.detach().float().cpu() * scale).tolist(), labels):
        _draw_box(draw, panel.size, box, label, colour, font, line)
    return panel


def pseudo_label_picture(
    image: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    raw_boxes: Tensor,
    raw_labels: Tensor,
    polished_boxes: Tensor,
    polished_labels: Tensor,
    class_names: tuple[str, ...],
) -> Image.Image:
    """Three panels of one weak view ``image`` [3, H, W] in 0..1; boxes xyxy in its pixels.

    Left: hidden ground truth (green). Middle: raw pseudo labels (red). Right: polished
    pseudo labels (blue: polished boxes with their polished labels). Each panel is the view
    enlarged ``panel_scale(H, W)`` times, its boxes labelled, under a title with its box
    count in a white band (``TITLE_HEIGHT`` pixels).
    """

    def names(labels: Tensor) -> list[str]:
        return [class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else "?" for label in labels]

    scale = panel_scale(*image.shape[-2:])
    colours = ((0, 170, 0), (220, 0, 0), (0, 0, 230))
    panels = [_panel(image, boxes, names(labels), colour, scale) for (boxes, labels), colour in
              zip(((gt_boxes, gt_labels), (raw_boxes, raw_labels), (polished_boxes, polished_labels)), colours)]
    width, height = panels[0].size
    picture = Image.new("RGB", (3 * width, height + TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=TITLE_HEIGHT - 8)
    # A title over each panel: which boxes, how many (an empty panel then says 0, not nothing).
    titles = [f"ground truth: {len(gt_boxes)}", f"raw: {len(raw_boxes)}", f"polished: {len(polished_boxes)}"]
    for index, (panel, title, colour) in enumerate(zip(panels, titles, colours)):
        picture.paste(panel, (index * width, TITLE_HEIGHT))
        draw.text((index * width + 4, 3), title, fill=colour, font=font)
    return picture


def _draw_box(draw: ImageDraw.ImageDraw, size: tuple[int, int], box: list[float], text: str,
              colour: tuple[int, int, int], font, line: int) -> None:
    """``box`` (x1, y1, x2, y2) outlined in ``colour``, ``text`` on a band of that colour just
    above it, or just below it when the box touches the top: never over the box's inside."""
    x1, y1, x2, y2 = box
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    y = y1 - line - height if y1 - line - height >= 0 else min(y2 + line, size[1] - height)
    x = min(max(x1, 0), max(size[0] - width, 0))
    draw.rectangle((x, y, x + width, y + height), fill=colour)
    brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill="black" if brightness > 140 else "white", font=font)


def detection_picture(image: Image.Image, boxes: Tensor, labels: Tensor, scores: Tensor,
                      class_names: tuple[str, ...], colours: list[tuple[int, int, int]]) -> Image.Image:
    """``image`` (RGB) with its detections: boxes [K, 4] xyxy in its pixels, labels [K]
    contiguous 1..C, scores [K]. Each class has its colour (``colours[label - 1]``); the label
    ("name 0.87") sits on a band of that colour just above its box, or just below it when
    the box touches the top, so it never covers the box or what is in it."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, min(picture.size) // 40))
    line = max(1, min(picture.size) // 300 + 1)
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else "?"
        _draw_box(draw, picture.size, box, f"{name} {score:.2f}", colours[(int(label) - 1) % len(colours)], font, line)
    return picture
