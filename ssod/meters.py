"""What the loop measures between log intervals: mean losses and statistics, skipped steps,
and pseudo-label quality against the unlabeled images' hidden ground truth (and its pictures)."""

from __future__ import annotations

from collections import deque

import torch

from ssod.data.transforms import project_boxes
from ssod.evaluation import PseudoLabelQuality
from ssod.visualize import pseudo_label_picture


class Meters:
    """Interval averages of losses and statistics, and pseudo-label quality.

    Values stay tensors, and pseudo labels are only kept, until ``compute`` (once per log
    interval): the step itself does not wait for the device on their account.
    """

    def __init__(self, cls_threshold: float, class_names: tuple[str, ...]) -> None:
        self.cls_threshold = cls_threshold
        self.class_names = class_names
        self.quality = PseudoLabelQuality()
        # The last few unlabeled images, kept for the pictures logged at evaluation.
        self.recent: deque[dict] = deque(maxlen=8)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0
        self.pending: list[dict] = []
        self.quality.reset()

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def update(self, result, total: torch.Tensor, unlabeled: list, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            return
        self._add("train/loss", total)
        for name, value in result.losses.items():
            self._add(f"train/{name}", value)
        for name, value in result.stats.items():
            self._add(name, value)
        if result.teacher is not None:
            self._update_quality(result.teacher.pseudo_labels, unlabeled)

    def _update_quality(self, pseudo_labels, unlabeled: list) -> None:
        """Keep what pseudo-label quality needs; ``compute`` measures it (the step never waits)."""
        for labels, (weak, _, hidden) in zip(pseudo_labels, unlabeled):
            sample = {"pseudo": labels, "matrix": weak.matrix, "size": tuple(weak.image.shape[-2:]), "hidden": hidden}
            self.pending.append(sample)
            self.recent.append({**sample, "image": weak.image})

    def _measure_quality(self) -> None:
        """Compare pending pseudo labels (weak view) with the hidden ground truth projected into it."""
        for sample in self.pending:
            labels = sample["pseudo"]
            gt_boxes, gt_labels = hidden_ground_truth(sample)
            self.quality.update(labels, gt_boxes, gt_labels, self.cls_threshold)
        self.pending.clear()

    def compute(self) -> dict[str, float]:
        scalars = {name: (self.sums[name] / self.counts[name]).item() for name in self.sums}
        scalars["train/skipped_steps_interval"] = float(self.skipped)
        self._measure_quality()
        quality = self.quality.compute()
        if quality.get("pseudo/images", 0):
            scalars.update(quality)
        self.reset()
        return scalars


def hidden_ground_truth(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden ground truth of an unlabeled image, projected into its weak view."""
    height, width = sample["size"]
    hidden = sample["hidden"]
    boxes, keep = project_boxes(hidden["boxes"], sample["matrix"], width, height)
    return boxes, hidden["labels"][keep]


def log_pictures(tracker, recent, class_names: tuple[str, ...], step: int, limit: int) -> None:
    """Ground truth | raw pseudo labels | polished pseudo labels of the last ``limit`` unlabeled images."""
    for index, sample in enumerate(list(recent)[-limit:] if limit > 0 else []):
        pseudo = sample["pseudo"]
        kept = pseudo.cls_keep
        picture = pseudo_label_picture(
            sample["image"], *hidden_ground_truth(sample), pseudo.boxes, pseudo.labels,
            pseudo.reg_boxes[kept], pseudo.cls_labels[kept], class_names,
        )
        tracker.log_image(picture, f"pseudo_labels/step_{step:08d}_{index}.png")
