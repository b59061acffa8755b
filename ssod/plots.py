"""Evaluation pictures: precision-recall curves per class and a detection confusion matrix.

Drawn with matplotlib's object API on its Agg canvas (no pyplot, no global figure state),
returned as PIL images for ``Tracker.log_image`` or a file.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# A legend or cell numbers past this many classes would hide the plot.
MAX_NAMED_CLASSES = 20


def _picture(figure) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def pr_curves_picture(recall: np.ndarray, precision: dict[str, np.ndarray], names: list[str],
                      average_precision: dict[str, list[float]]) -> Image.Image:
    """One panel per IoU threshold (``precision``'s keys, e.g. ``"IoU 0.50"``).

    recall: [R] the recall thresholds; precision[key]: [R, C] per class, NaN where a class
    has no ground truth; average_precision[key]: [C] the classes' AP in [0, 1] (legend).
    Each class is a thin line, the mean over classes with ground truth a thick black one.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(precision), 5.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(precision), squeeze=False)[0]
    colours = class_colours(len(names))
    for axis, (key, values) in zip(axes, precision.items()):
        for index, name in enumerate(names):
            if not np.isnan(values[:, index]).all():
                ap = average_precision[key][index]
                axis.plot(recall, values[:, index], color=colours[index], linewidth=1,
                          label=f"{name} {100 * ap:.1f}" if len(names) <= MAX_NAMED_CLASSES else None)
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=1) if not np.isnan(values).all() else np.full(len(recall), np.nan)
        finite = [ap for ap in average_precision[key] if not math.isnan(ap)]
        overall = 100 * sum(finite) / len(finite) if finite else math.nan
        axis.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes {overall:.1f}")
        axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
                 title=f"precision-recall, {key} (AP in %)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left", fontsize=8)
    return _picture(figure)


def confusion_picture(matrix: np.ndarray, names: list[str], score_threshold: float, iou_threshold: float) -> Image.Image:
    """``matrix`` [C + 1, C + 1] counts: rows predicted class, columns true class, the last
    row and column "background" (a missed object, a detection of nothing). Each column is
    coloured by its share of the true class's objects; the cells give the counts."""
    from matplotlib.figure import Figure

    labels = [*names, "background"]
    size = min(4 + 0.45 * len(labels), 24)
    figure = Figure(figsize=(size + 1.5, size), dpi=100, layout="constrained")
    axis = figure.subplots()
    totals = matrix.sum(axis=0, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, shrink=0.8, label="share of the true class (column)")
    ticks = range(len(labels))
    axis.set_xticks(ticks, labels, rotation=90 if len(labels) > 8 else 45, ha="right" if len(labels) <= 8 else "center")
    axis.set_yticks(ticks, labels)
    axis.set(xlabel="true class", ylabel="predicted class",
             title=f"confusion matrix (score >= {score_threshold:g}, IoU >= {iou_threshold:g})")
    if len(labels) <= MAX_NAMED_CLASSES + 1:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                axis.text(column, row, int(count), ha="center", va="center", fontsize=8,
                          color="white" if shares[row, column] > 0.5 else "black")
    return _picture(figure)


def class_colours(count: int) -> list[tuple[float, float, float]]:
    """``count`` distinct colours (matplotlib's tab10 or tab20, past 20 evenly spaced hues), RGB in [0, 1]."""
    from matplotlib import colormaps

    if count <= 20:
        name = "tab10" if count <= 10 else "tab20"
        return [tuple(colormaps[name](index)[:3]) for index in range(count)]
    return [tuple(colormaps["hsv"](index / count)[:3]) for index in range(count)]


# The pseudo-label measures with a value before and after polishing: (title, metric prefix).
BEFORE_AFTER = (("box IoU with the ground truth", "pseudo/iou_mean"), ("label accuracy", "pseudo/label_acc"))


def before_after_picture(histories: dict[str, list[tuple[int, float]]]) -> Image.Image:
    """Pseudo-label quality before (raw) and after polishing over training: one panel per
    ``BEFORE_AFTER`` measure, ``<prefix>/raw`` and ``<prefix>/polished`` against the step.

    histories: metric name -> [(step, value)], any order; a missing name draws no line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(BEFORE_AFTER), 4.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(BEFORE_AFTER), squeeze=False)[0]
    for axis, (title, prefix) in zip(axes, BEFORE_AFTER):
        for kind, colour in (("raw", "tab:red"), ("polished", "tab:blue")):
            points = sorted(histories.get(f"{prefix}/{kind}", []))
            if points:
                axis.plot(*zip(*points), color=colour, marker="o", markersize=3, linewidth=1.5,
                          label=f"{kind} (last {points[-1][1]:.3f})")
        axis.set(xlabel="step", ylabel=title, title=f"{title}: raw / polished ({prefix})")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(loc="lower right", fontsize=9)
    return _picture(figure)
