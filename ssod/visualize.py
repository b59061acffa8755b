"""Pictures: ground truth, raw and polished pseudo labels side by side (for MLflow), and an
image with its detections, a colour per class (``ssod-predict --draw``)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def _panel(image: Tensor, boxes: Tensor, labels: list[str], colour: str) -> Tensor:
    canvas = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
    if boxes.numel() == 0:
        return canvas
    return draw_bounding_boxes(canvas, boxes.detach().float().cpu(), labels=labels, colors=colour, width=1)


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
    pseudo labels (blue: polished boxes with their polished labels). Each panel has a title
    with its box count in a white band above it (``TITLE_HEIGHT`` pixels).
    """

    def names(labels: Tensor) -> list[str]:
        return [class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else "?" for label in labels]

    panels = [
        _panel(image, gt_boxes, names(gt_labels), "lime"),
        _panel(image, raw_boxes, names(raw_labels), "red"),
        _panel(image, polished_boxes, names(polished_labels), "blue"),
    ]
    strip = Image.fromarray(torch.cat(panels, dim=2).permute(1, 2, 0).numpy())
    # A title over each panel: which boxes, how many (an empty panel then says 0, not nothing).
    titles = [f"ground truth: {len(gt_boxes)}", f"raw: {len(raw_boxes)}", f"polished: {len(polished_boxes)}"]
    picture = Image.new("RGB", (strip.width, strip.height + TITLE_HEIGHT), "white")
    picture.paste(strip, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(picture)
    width = image.shape[-1]
    for index, (title, colour) in enumerate(zip(titles, ("green", "red", "blue"))):
        draw.text((index * width + 2, 1), title, fill=colour)
    return picture


TITLE_HEIGHT = 12


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
        colour = colours[(int(label) - 1) % len(colours)]
        x1, y1, x2, y2 = box
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else "?"
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 4, bottom - top + 4
        y = y1 - line - height if y1 - line - height >= 0 else min(y2 + line, picture.height - height)
        x = min(max(x1, 0), max(picture.width - width, 0))
        draw.rectangle((x, y, x + width, y + height), fill=colour)
        brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x + 2 - left, y + 2 - top), text, fill="black" if brightness > 140 else "white", font=font)
    return picture
