"""RoIAlign over all pyramid levels at once, as a gathered weighted sum (for the CPU).

torchvision's CPU RoIAlign runs on one thread, one pyramid level at a time; its backward
recomputes every bilinear weight once per channel and adds the gradient element by
element. On a CPU step of Polishing Teacher that is the largest single cost after the
convolutions (the polishing networks pool thousands of boxes, the student's RoI head
pools and back-propagates hundreds).

With a fixed sampling ratio ``s``, every output cell of RoIAlign is a weighted sum of
``4 * s * s`` feature vectors: ``s x s`` sample points, each the bilinear mix of its four
neighbours, averaged. Indices and weights depend on the boxes only. Stacking the feature
maps of all levels as rows ``[sum_l B * H_l * W_l, C]`` (channels last), the pooling of
every box on its own level is one ``F.embedding_bag`` (weighted sum of rows, on all
threads), and its gradient is the same sum transposed: the (cell, neighbour) pairs
sorted by feature row, then another ``embedding_bag``. The sample points and bilinear
rules are torchvision's (``aligned=False``), so the values are its values up to the
order of float additions (``tests/models/test_roi_align.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops.poolers import _convert_to_roi_format

from ssod.models.rcnn import LevelSortedRoIAlign


class _WeightedRowSum(torch.autograd.Function):
    """``out[i] = sum_k weights[i, k] * table[indices[i, k]]``; the gradient reaches ``table`` only.

    Shapes: ``table [N, C]``, ``indices [M, K]`` int64 (rows of ``table``), ``weights [M, K]``
    in the table's dtype -> ``[M, C]``.
    """

    @staticmethod
    def forward(ctx, table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(indices, weights)
        ctx.rows = table.shape[0]
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        indices, weights = ctx.saved_tensors
        # Only pairs that carry weight: a sample outside the map reads a real row with
        # weight 0, and 0 * a non-finite gradient would reach that row (torchvision skips it).
        pairs = torch.nonzero(weights.flatten()).squeeze(1)
        rows = indices.flatten()[pairs]
        # Group the (cell, neighbour) pairs by the row they read: each row's gradient is
        # then one bag, the weighted sum of the output gradients of its cells.
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=ctx.rows)
        starts = counts.cumsum(0) - counts
        pairs = pairs[order]
        cells = torch.div(pairs, indices.shape[1], rounding_mode="floor")
        grad_table = F.embedding_bag(
            cells, grad.contiguous(), starts, mode="sum", per_sample_weights=weights.flatten()[pairs]
        )
        return grad_table, None, None


def _neighbours(coords: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear neighbours along one axis, torchvision's rules (``bilinear_interpolate``).

    Args: ``coords [R, P]`` sample coordinates in feature cells; ``size [R, 1]`` the map's
    extent (float). Returns ``[R, P, 2]`` int64 low/high cells and their float weights;
    a sample outside ``[-1, size]`` (or not finite) gets zero weights.
    """
    inside = (coords >= -1.0) & (coords <= size)
    coords = torch.where(inside, coords, 0.0).clamp(min=0.0)
    low = coords.floor()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, 0.0, coords - low)
    weights = torch.stack([1 - frac, frac], dim=-1) * inside.unsqueeze(-1)
    return torch.stack([low, high], dim=-1).long(), weights


def _sample_points(start: Tensor, extent: Tensor, bins: int, ratio: int) -> Tensor:
    """``[R, bins * ratio]`` sample coordinates: bin ``p``, point ``i`` at ``start + p*bin + (i+0.5)*bin/ratio``."""
    bin_size = extent / bins
    cell = torch.arange(bins * ratio, device=start.device)
    which_bin = torch.div(cell, ratio, rounding_mode="floor").to(start.dtype)
    point = (cell % ratio).to(start.dtype)
    return start[:, None] + which_bin * bin_size[:, None] + (point + 0.5) * bin_size[:, None] / ratio


def gather_plan(
    rois: Tensor,
    levels: Tensor,
    shapes: list[tuple[int, int, int]],
    scales: list[float],
    output_size: tuple[int, int],
    ratio: int,
) -> tuple[Tensor, Tensor]:
    """Rows and weights of every output cell in the stacked channels-last feature rows.

    Args:
        rois: ``[R, 5]`` float ``(batch index, x1, y1, x2, y2)``, absolute input pixels.
        levels: ``[R]`` int64 pyramid level of each box.
        shapes: per level ``(B, H_l, W_l)``; scales: per level, feature cells per pixel.

    Returns:
        ``indices [R * PH * PW, 4 * ratio**2]`` int64 and ``weights`` (same shape, float,
        including the ``1 / ratio**2`` average); cells in ``(box, row, column)`` order.
    """
    device, count = rois.device, rois.shape[0]
    sizes = torch.tensor([[h, w] for _, h, w in shapes], dtype=rois.dtype, device=device)[levels]
    level_starts = torch.tensor([0] + [b * h * w for b, h, w in shapes], device=device).cumsum(0)[levels]
    scale = torch.tensor(scales, dtype=rois.dtype, device=device)[levels]
    x1, y1, x2, y2 = (rois[:, k] * scale for k in range(1, 5))
    # torchvision (aligned=False): boxes are at least one cell wide and high.
    heights, widths = (y2 - y1).clamp(min=1.0), (x2 - x1).clamp(min=1.0)
    row, row_weight = _neighbours(_sample_points(y1, heights, output_size[0], ratio), sizes[:, :1])
    col, col_weight = _neighbours(_sample_points(x1, widths, output_size[1], ratio), sizes[:, 1:])
    height, width = sizes[:, 0].long(), sizes[:, 1].long()
    base = level_starts + rois[:, 0].long() * height * width
    row = (base[:, None, None] + row * width[:, None, None]).view(count, output_size[0], 1, ratio, 2, 1, 1)
    col = col.view(count, 1, output_size[1], 1, 1, ratio, 2)
    row_weight = row_weight.view(count, output_size[0], 1, ratio, 2, 1, 1)
    col_weight = col_weight.view(count, 1, output_size[1], 1, 1, ratio, 2) / (ratio * ratio)
    shape = (count * output_size[0] * output_size[1], 4 * ratio * ratio)
    return (row + col).reshape(shape), (row_weight * col_weight).reshape(shape)


def pyramid_roi_align(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    ratio: int,
) -> Tensor:
    """RoIAlign of each box on its pyramid level, all levels in one weighted sum.

    Args:
        features: per level ``[B, C, H_l, W_l]`` (any memory format).
        rois: ``[R, 5]`` ``(batch index, x1, y1, x2, y2)``; levels: ``[R]`` int64.
        scales: per level; output_size: ``(PH, PW)``; ratio: sample points per bin side (> 0).

    Returns:
        ``[R, C, PH, PW]`` in the first level's dtype, computed in float32 at least (as
        torchvision computes RoIAlign under autocast; float64 maps stay float64).
        Gradients reach the features, not the boxes.
    """
    if ratio <= 0:
        raise ValueError(f"pyramid_roi_align needs a fixed sampling ratio, got {ratio}")
    channels = features[0].shape[1]
    dtype = functools.reduce(torch.promote_types, [feature.dtype for feature in features], torch.float32)
    shapes = [(feature.shape[0], feature.shape[2], feature.shape[3]) for feature in features]
    with torch.no_grad():
        indices, weights = gather_plan(rois.to(dtype), levels, shapes, scales, output_size, ratio)
    with torch.autocast(features[0].device.type, enabled=False):
        # One copy of the maps, as rows: level by level, each [B, H*W, C] view written into
        # its slice (the dtype conversion included).
        table = features[0].new_empty((sum(b * h * w for b, h, w in shapes), channels), dtype=dtype)
        start = 0
        for feature, (batch, height, width) in zip(features, shapes):
            rows = batch * height * width
            table[start : start + rows].view(batch, height * width, channels).copy_(feature.flatten(2).transpose(1, 2))
            start += rows
        pooled = _WeightedRowSum.apply(table, indices, weights)
    # Back as [R, C, PH*PW]: a three-dimensional transpose copies several times faster on a
    # CPU than the equivalent four-dimensional permute.
    pooled = pooled.view(rois.shape[0], output_size[0] * output_size[1], channels).transpose(1, 2).contiguous()
    return pooled.view(rois.shape[0], channels, *output_size).to(features[0].dtype)


class PyramidRoIAlign(LevelSortedRoIAlign):
    """The detector's RoI pooler: ``pyramid_roi_align`` on a CPU, ``LevelSortedRoIAlign`` elsewhere.

    torchvision's ``MultiScaleRoIAlign`` interface and level mapping; on a GPU its kernel
    stays (fast there, and each box's value exact), with one wait per call.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = self.pyramid(x, image_shapes)
        if features[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return self.pool_level_sorted(features, boxes)
        rois, levels = _convert_to_roi_format(boxes), self.map_levels(boxes)
        return pyramid_roi_align(features, rois, levels, self.scales, self.output_size, self.sampling_ratio)
