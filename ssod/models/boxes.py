"""Pure box helpers: IoU, validity, clipping, jitter, voting, delta coding.

Conventions for every function here: boxes are ``[N, 4]`` float tensors in ``xyxy``
order, absolute pixels; image sizes are ``(height, width)``. Nothing here loops over
boxes, and nothing keeps state.

The jitter and the six voted boxes reproduce the reference implementation of
Polishing Teacher (``snowdusky/DualPolishLearning``, ``ssod/models/polish_teacher.py``,
``PolishTeacher.aug_box`` and ``PolishTeacher.vote_box``): see the docstrings of
:func:`jitter_boxes` and :func:`vote_boxes` for the exact patterns.
"""

import functools
import math

import torch
import torchvision
from torch import Tensor

# Largest |dw|, |dh| fed to exp() when decoding: log(1000 / 16), as mmdetection's
# ``wh_ratio_clip`` and torchvision's ``bbox_xform_clip``.
DELTA_WH_CLIP = math.log(1000.0 / 16)

# Sign patterns of the six voted boxes, columns (x1, y1, x2, y2), each multiplied by
# (frac * w, frac * h, frac * w, frac * h). The first four translate the box towards
# the four corners (two sides move out, the opposite two move in), the last two
# enlarge it by frac and by 2 * frac on every side. Order as in the reference.
VOTE_SIGNS = (
    (-1.0, -1.0, -1.0, -1.0),  # towards top-left
    (1.0, -1.0, 1.0, -1.0),  # towards top-right
    (-1.0, 1.0, -1.0, 1.0),  # towards bottom-left
    (1.0, 1.0, 1.0, 1.0),  # towards bottom-right
    (-1.0, -1.0, 1.0, 1.0),  # enlarged by frac
    (-2.0, -2.0, 2.0, 2.0),  # enlarged by 2 * frac
)
NUM_VOTES = len(VOTE_SIGNS) + 1


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU matrix: boxes1 ``[N, 4]``, boxes2 ``[M, 4]`` -> ``[N, M]``."""
    return torchvision.ops.box_iou(boxes1, boxes2)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise IoU of two aligned box lists ``[N, 4]`` and ``[N, 4]`` -> ``[N]``."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return intersection / (area1 + area2 - intersection + eps)


def valid_boxes_mask(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """``[N]`` bool: width > min_size and height > min_size (strictly).

    With the default ``min_size=0`` this drops exactly the boxes with
    ``x2 <= x1`` or ``y2 <= y1``, which torchvision's detectors assert on.
    """
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > min_size) & (heights > min_size)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``[N, 4]`` boxes to an image of ``(height, width)``: x in [0, w], y in [0, h]."""
    return torchvision.ops.clip_boxes_to_image(boxes, (int(image_size[0]), int(image_size[1])))


def _half_sizes(boxes: Tensor) -> Tensor:
    """``[N, 4]`` = (w, h, w, h) with w and h clamped to at least 1 pixel."""
    sizes = (boxes[:, 2:4] - boxes[:, 0:2]).clamp(min=1.0)
    return sizes.repeat(1, 2)


def jitter_boxes(
    boxes: Tensor, num: int, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian copies of each box: ``[N, 4]`` -> ``[num * N, 4]``.

    Every coordinate gets independent noise with std ``scale * w`` for x1, x2 and
    ``scale * h`` for y1, y2, where w and h are clamped to at least 1 pixel (as the
    reference ``aug_box``). Output is copy-major: row ``k * N + i`` is copy ``k`` of
    box ``i``, so the source of every row is ``torch.arange(N).repeat(num)``.
    Copies may be degenerate; filter them with :func:`valid_boxes_mask`.

    Args:
        generator: drawn from on its own device, then moved to ``boxes.device``.
    """
    device = generator.device if generator is not None else boxes.device
    noise = torch.randn(
        (num, boxes.shape[0], 4), generator=generator, device=device, dtype=boxes.dtype
    ).to(boxes.device)
    jittered = boxes[None] + noise * (_half_sizes(boxes) * scale)[None]
    return jittered.reshape(-1, 4)


def vote_boxes(boxes: Tensor, frac: float = 0.06) -> Tensor:
    """The box and its six voted boxes: ``[N, 4]`` -> ``[N, 7, 4]``.

    Index 0 is the box itself; index ``1 + k`` adds ``VOTE_SIGNS[k] * frac * (w, h, w, h)``
    to it, w and h clamped to at least 1 pixel first. For ``[10, 20, 110, 70]`` and
    frac 0.06 (dw = 6, dh = 3) the seven boxes are ``[10, 20, 110, 70]``,
    ``[4, 17, 104, 67]``, ``[16, 17, 116, 67]``, ``[4, 23, 104, 73]``,
    ``[16, 23, 116, 73]``, ``[4, 17, 116, 73]``, ``[-2, 14, 122, 76]``. Voted boxes are
    not clipped to the image (nor are they in the reference).
    """
    offsets = _vote_signs(boxes.device, boxes.dtype)[None] * (_half_sizes(boxes) * frac)[:, None]
    return boxes[:, None, :] + offsets


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor of ``values``, made once per device and dtype.

    A tensor made from Python numbers on every call is a blocking copy to a GPU: the host
    waits for all queued work first. Never modify the returned tensor in place.
    """
    return torch.tensor(values, dtype=dtype).to(device)


def _vote_signs(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[7, 4]``: no offset for the box itself, then ``VOTE_SIGNS``."""
    return device_constant(((0.0, 0.0, 0.0, 0.0),) + VOTE_SIGNS, device, dtype)


def encode_deltas(boxes: Tensor, targets: Tensor) -> Tensor:
    """Deltas that move ``boxes`` ``[N, 4]`` onto ``targets`` ``[N, 4]`` -> ``[N, 4]``.

    Standard centre/size coding, means 0 and stds 1:
    ``(dx, dy, dw, dh) = ((tx - px) / pw, (ty - py) / ph, log(tw / pw), log(th / ph))``.
    """
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centre_x, centre_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    target_widths, target_heights = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    target_x = targets[:, 0] + 0.5 * target_widths
    target_y = targets[:, 1] + 0.5 * target_heights
    return torch.stack(
        (
            (target_x - centre_x) / widths,
            (target_y - centre_y) / heights,
            torch.log(target_widths / widths),
            torch.log(target_heights / heights),
        ),
        dim=1,
    )


def decode_deltas(boxes: Tensor, deltas: Tensor) -> Tensor:
    """Apply ``deltas`` ``[N, 4]`` to ``boxes`` ``[N, 4]`` -> ``[N, 4]`` (inverse of encode).

    ``dw`` and ``dh`` are clamped to ``[-DELTA_WH_CLIP, DELTA_WH_CLIP]`` before ``exp``,
    on both sides as mmdetection's ``DeltaXYWHBBoxCoder`` (torchvision's ``BoxCoder``
    clamps only the upper side). Computed in ``deltas.dtype``; not clipped to the image.
    """
    boxes = boxes.to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centre_x = boxes[:, 0] + 0.5 * widths + deltas[:, 0] * widths
    centre_y = boxes[:, 1] + 0.5 * heights + deltas[:, 1] * heights
    half_w = 0.5 * widths * deltas[:, 2].clamp(-DELTA_WH_CLIP, DELTA_WH_CLIP).exp()
    half_h = 0.5 * heights * deltas[:, 3].clamp(-DELTA_WH_CLIP, DELTA_WH_CLIP).exp()
    return torch.stack(
        (centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=1
    )


def best_overlap(boxes: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Best IoU of each box with any ground-truth box, and which one.

    Args:
        boxes: ``[N, 4]``.
        gt_boxes: ``[G, 4]``; may be empty.

    Returns:
        iou: ``[N]`` float, 0 where ``G == 0``.
        index: ``[N]`` int64 into ``gt_boxes``; -1 where ``G == 0`` (so that indexing
        the empty ground truth with it fails loudly rather than silently).
    """
    if gt_boxes.shape[0] == 0:
        iou = boxes.new_zeros(boxes.shape[0])
        return iou, torch.full_like(iou, -1, dtype=torch.int64)
    iou, index = box_iou(boxes, gt_boxes).max(dim=1)
    return iou, index
