"""Image views for teacher-student training, every geometric step recorded as a matrix.

Images: float32 [3, H, W] in 0..1 (PIL converted on entry). Boxes: float [N, 4] xyxy,
absolute pixels, continuous coordinates (pixel column i covers [i, i + 1], so a flip maps
x to W - x). Matrices: float64 [3, 3], homogeneous ORIGINAL-image pixel coordinates
(x, y, 1) -> VIEW pixel coordinates, composed by left-multiplication;
`relative_matrix(weak, strong)` carries teacher boxes into the student's view.

As Soft Teacher's configs/soft_teacher/base.py: the weak and the strong view each draw
their own resize and flip; the strong view then gets one photometric and one geometric op
in random order, then random erasing. Randomness: torch's global RNG or a Generator.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torch.nn.functional import grid_sample

# Per-box target keys filtered together with the boxes; other keys pass through untouched.
PER_BOX_KEYS = ("labels", "scores", "iscrowd", "area")
# Soft Teacher's photometric OneOf (RandAugment ops with a magnitude level out of 10).
PHOTOMETRIC_OPS = (
    "identity", "autocontrast", "equalize", "solarize", "color",
    "contrast", "brightness", "sharpness", "posterize",
)
_ENHANCE_OPS = {
    "color": F.adjust_saturation,
    "contrast": F.adjust_contrast,
    "brightness": F.adjust_brightness,
    "sharpness": F.adjust_sharpness,
}
# Soft Teacher fills uncovered and erased pixels with 125 of 255.
GREY = 125.0 / 255.0


@dataclass(frozen=True)
class View:
    """One augmented view: `image` float32 [3, H, W] in 0..1; `matrix` float64 [3, 3],
    original-image pixel coordinates -> this view's pixel coordinates."""

    image: Tensor
    matrix: Tensor


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], both inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _affine(a: float, b: float, c: float, d: float, e: float, f: float) -> Tensor:
    return torch.tensor([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]], dtype=torch.float64)


def to_float_image(image: Image.Image | Tensor) -> Tensor:
    """PIL image or uint8/float tensor [3, H, W] -> plain float32 tensor [3, H, W] in 0..1."""
    if not isinstance(image, Tensor):
        image = F.to_image(image)
    return F.to_dtype(image.as_subclass(Tensor), torch.float32, scale=True)


def map_boxes(boxes: Tensor, matrix: Tensor, width: int, height: int, min_size: float = 1.0) -> tuple[Tensor, Tensor]:
    """Map boxes through `matrix` and clip them to the view, keeping every row.

    boxes: [N, 4] xyxy absolute pixels in the source coordinates; matrix: [3, 3] source ->
    destination; width, height: the destination canvas. Each box becomes the axis-aligned
    box enclosing its 4 transformed corners, clipped to [0, width] x [0, height].
    Returns (mapped [N, 4] float64, valid [N] bool): valid where the box is at least
    `min_size` wide and high after clipping, and finite. Nothing here waits for a GPU.
    """
    x1, y1, x2, y2 = boxes.to(torch.float64).unbind(dim=1)
    # Corners as [N, 4, 3] homogeneous points (stacked, not indexed with a Python list: that
    # index would be a blocking copy to a GPU).
    corners = torch.stack([torch.stack([x1, x2, x1, x2], dim=1), torch.stack([y1, y1, y2, y2], dim=1)], dim=-1)
    corners = torch.cat([corners, torch.ones_like(corners[..., :1])], dim=-1)
    mapped = corners @ matrix.to(boxes.device, torch.float64).T  # [N, 4 corners, 3]
    points = mapped[..., :2] / mapped[..., 2:]
    # Python-number bounds: a bound tensor made on the host would be a blocking copy to a GPU.
    lower, upper = points.amin(dim=1), points.amax(dim=1)
    projected = torch.stack(
        [lower[:, 0].clamp(0, width), lower[:, 1].clamp(0, height), upper[:, 0].clamp(0, width), upper[:, 1].clamp(0, height)],
        dim=1,
    )
    size = projected[:, 2:] - projected[:, :2]
    valid = (size >= min_size).all(dim=1) & projected.isfinite().all(dim=1)
    return projected, valid


def project_boxes(
    boxes: Tensor, matrix: Tensor, width: int, height: int, min_size: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`map_boxes`, then only the valid boxes.

    Returns (kept boxes [M, 4] in the dtype of `boxes`, keep [N] bool): boxes narrower or
    lower than `min_size` after clipping (or not finite) are dropped, never asserted on,
    so that labels and scores can be filtered with `keep`.
    """
    projected, keep = map_boxes(boxes, matrix, width, height, min_size)
    return projected[keep].to(boxes.dtype), keep


def project_target(
    target: dict, matrix: Tensor, width: int, height: int, min_size: float = 1.0
) -> dict:
    """A copy of `target` with 'boxes' [N, 4] projected by `project_boxes` and the
    PER_BOX_KEYS present filtered alike ('area' keeps its original-image values)."""
    boxes, keep = project_boxes(target["boxes"], matrix, width, height, min_size)
    projected = dict(target, boxes=boxes)
    for key in PER_BOX_KEYS:
        if key in target:
            projected[key] = target[key][keep]
    return projected


def relative_matrix(src_matrix: Tensor, dst_matrix: Tensor) -> Tensor:
    """[..., 3, 3] matrices mapping src-view pixels to dst-view pixels, both views being of
    the same original image (e.g. teacher's weak view -> student's strong view). Batched
    matrices give a batch; the inverse does not check for singularity (a view's matrix never
    is), so nothing here waits for a GPU."""
    inverse, _ = torch.linalg.inv_ex(src_matrix.to(torch.float64))
    return dst_matrix.to(torch.float64) @ inverse


def sample_short_side(
    min_sizes: Sequence[int], resize_mode: str, generator: torch.Generator | None = None
) -> int:
    """'range': uniform integer in [min_sizes[0], min_sizes[-1]] (one or two values);
    'choice': one of `min_sizes`."""
    if resize_mode == "range":
        return _randint(int(min_sizes[0]), int(min_sizes[-1]), generator)
    return int(min_sizes[_randint(0, len(min_sizes) - 1, generator)])


def _check_sizes(min_sizes: Sequence[int], max_size: int, resize_mode: str) -> None:
    if resize_mode not in ("range", "choice"):
        raise ValueError(f"resize_mode must be 'range' or 'choice', got {resize_mode!r}")
    if len(min_sizes) == 0 or min(min_sizes) < 1 or max_size < 1:
        raise ValueError(f"bad sizes: min_sizes={list(min_sizes)}, max_size={max_size}")
    if resize_mode == "range" and len(min_sizes) > 2:
        raise ValueError(f"resize_mode='range' takes [low, high], got {list(min_sizes)}")


def resize(image: Tensor, short_side: int, max_size: int) -> tuple[Tensor, Tensor]:
    """Resize [C, H, W] keeping the aspect ratio so that the short side is `short_side`,
    unless the long side would exceed `max_size` (then the long side is `max_size`)."""
    height, width = image.shape[-2:]
    scale = min(short_side / min(height, width), max_size / max(height, width))
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.resize(image, [new_height, new_width], antialias=True)
    return resized, _affine(new_width / width, 0, 0, 0, new_height / height, 0)


def hflip(image: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror [C, H, W] left-right: x -> W - x."""
    return image.flip(-1), _affine(-1, 0, image.shape[-1], 0, 1, 0)


def warp_affine(image: Tensor, matrix: Tensor, fill: float = 0.0) -> Tensor:
    """Warp [C, H, W] by an affine `matrix` (input pixel coords -> output pixel coords)
    onto a canvas of the same size, bilinearly; pixels from outside get `fill`."""
    height, width = image.shape[-2:]
    inverse = torch.linalg.inv(matrix.to(torch.float64))
    xs = (torch.arange(width, dtype=torch.float64) + 0.5)[None, :]
    ys = (torch.arange(height, dtype=torch.float64) + 0.5)[:, None]
    source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # align_corners=False: -1 and 1 are the outer edges of the border pixels.
    grid = torch.stack([source_x * (2 / width) - 1, source_y * (2 / height) - 1], dim=-1)
    # A channel of ones, warped alongside, tells how much of each pixel came from inside.
    stacked = torch.cat([image, torch.ones_like(image[:1])])[None]
    warped = grid_sample(stacked, grid.to(image.dtype)[None], align_corners=False)[0]
    return warped[:-1] + (1 - warped[-1:]) * fill


def translate(image: Tensor, dx: float, dy: float, fill: float = GREY) -> tuple[Tensor, Tensor]:
    """Shift [C, H, W] content by (dx, dy) pixels on the same canvas."""
    matrix = _affine(1, 0, dx, 0, 1, dy)
    return warp_affine(image, matrix, fill), matrix


def rotate(image: Tensor, angle_deg: float, fill: float = GREY) -> tuple[Tensor, Tensor]:
    """Rotate [C, H, W] about the image centre (W/2, H/2) by `angle_deg`, counter-clockwise
    as displayed (y points down), on the same canvas."""
    height, width = image.shape[-2:]
    center_x, center_y = width / 2, height / 2
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    matrix = _affine(
        cos, sin, center_x - cos * center_x - sin * center_y,
        -sin, cos, center_y + sin * center_x - cos * center_y,
    )
    return warp_affine(image, matrix, fill), matrix


def shear(
    image: Tensor, shear_x_deg: float, shear_y_deg: float, fill: float = GREY
) -> tuple[Tensor, Tensor]:
    """Shear [C, H, W] about the image centre: horizontally by `shear_x_deg`
    (x += tan * (y - H/2)), then vertically by `shear_y_deg` (y += tan * (x - W/2))."""
    height, width = image.shape[-2:]
    shear_x, shear_y = math.tan(math.radians(shear_x_deg)), math.tan(math.radians(shear_y_deg))
    horizontal = _affine(1, shear_x, -shear_x * height / 2, 0, 1, 0)
    vertical = _affine(1, 0, 0, shear_y, 1, -shear_y * width / 2)
    matrix = vertical @ horizontal
    return warp_affine(image, matrix, fill), matrix


def random_resize_flip(
    image: Tensor,
    min_sizes: Sequence[int],
    max_size: int,
    resize_mode: str = "range",
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Resize (see `sample_short_side`, `resize`), then flip with probability `flip_prob`.
    Returns (image [3, H', W'], matrix [3, 3] of both steps)."""
    short_side = sample_short_side(min_sizes, resize_mode, generator)
    image, matrix = resize(image, short_side, max_size)
    if _uniform(0, 1, generator) < flip_prob:
        image, flip_matrix = hflip(image)
        matrix = flip_matrix @ matrix
    return image, matrix


def random_geometric(
    image: Tensor,
    max_translate: float = 0.1,
    max_rotate_deg: float = 30.0,
    max_shear_deg: float = 30.0,
    fill: float = GREY,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One op, chosen uniformly as in Soft Teacher: translate x or y by up to
    `max_translate` of the image side, rotate up to `max_rotate_deg`, or shear in x then y
    up to `max_shear_deg` each. Returns (image, matrix of the step)."""
    height, width = image.shape[-2:]
    choice = _randint(0, 3, generator)
    if choice == 0:
        return translate(image, _uniform(-max_translate, max_translate, generator) * width, 0, fill)
    if choice == 1:
        return translate(image, 0, _uniform(-max_translate, max_translate, generator) * height, fill)
    if choice == 2:
        return rotate(image, _uniform(-max_rotate_deg, max_rotate_deg, generator), fill)
    shear_x = _uniform(-max_shear_deg, max_shear_deg, generator)
    return shear(image, shear_x, _uniform(-max_shear_deg, max_shear_deg, generator), fill)


def photometric_op(image: Tensor, name: str, level: int) -> Tensor:
    """Apply one of PHOTOMETRIC_OPS to [3, H, W] at RandAugment magnitude `level` (of 10),
    with Soft Teacher's parameter mapping (enhance factors 0.1 + 0.18 * level)."""
    if name == "identity":
        return image
    if name == "autocontrast":
        return F.autocontrast(image)
    if name == "equalize":
        return F.equalize(image)
    if name == "solarize":
        return F.solarize(image, threshold=min(int(level * 256 / 10), 255) / 255)
    if name == "posterize":
        return F.posterize(image, bits=4 - int(level * 4 / 10))
    return _ENHANCE_OPS[name](image, 0.1 + level * 1.8 / 10)


def random_photometric(image: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One op drawn uniformly from PHOTOMETRIC_OPS at a level drawn from 1..9."""
    name = PHOTOMETRIC_OPS[_randint(0, len(PHOTOMETRIC_OPS) - 1, generator)]
    return photometric_op(image, name, _randint(1, 9, generator))


def random_erase(
    image: Tensor,
    count: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (0.0, 0.2),
    fill: float = GREY,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill count[0]..count[1] (inclusive) rectangles of [C, H, W] with `fill`; each spans
    the same random fraction in `scale` of the width and of the height. No matrix change."""
    erased = image.clone()
    height, width = image.shape[-2:]
    for _ in range(_randint(count[0], count[1], generator)):
        ratio = _uniform(scale[0], scale[1], generator)
        patch_height, patch_width = int(ratio * height), int(ratio * width)
        top = _randint(0, height - patch_height, generator)
        left = _randint(0, width - patch_width, generator)
        erased[:, top : top + patch_height, left : left + patch_width] = fill
    return erased


class LabeledTransform:
    """Labeled view: random resize, flip, and one photometric op (if `photometric`).

    `min_sizes` with resize_mode 'range' is [low, high] of the short side, with 'choice' a
    list to pick from; the long side is capped at `max_size`. Boxes whose width or height
    falls under `min_box_size` are dropped with their PER_BOX_KEYS entries.
    """

    def __init__(
        self,
        min_sizes: Sequence[int],
        max_size: int,
        flip_prob: float = 0.5,
        photometric: bool = True,
        resize_mode: str = "range",
        min_box_size: float = 1.0,
    ) -> None:
        _check_sizes(min_sizes, max_size, resize_mode)
        self.min_sizes, self.max_size, self.resize_mode = tuple(min_sizes), max_size, resize_mode
        self.flip_prob, self.photometric, self.min_box_size = flip_prob, photometric, min_box_size

    def __call__(
        self, image: Image.Image | Tensor, target: dict, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict, Tensor]:
        """image: PIL or [3, H, W]; target: 'boxes' [N, 4] xyxy original pixels, 'labels' [N].
        Returns (image [3, H', W'], target in view pixels, matrix [3, 3])."""
        image, matrix = random_resize_flip(
            to_float_image(image), self.min_sizes, self.max_size, self.resize_mode,
            self.flip_prob, generator,
        )
        if self.photometric:
            image = random_photometric(image, generator)
        height, width = image.shape[-2:]
        return image, project_target(target, matrix, width, height, self.min_box_size), matrix


class WeakStrongTransform:
    """Two views of one unlabeled image, each with its own random resize and flip (as Soft
    Teacher's weak and strong pipelines). Weak: resize + flip. Strong: resize + flip, then
    a photometric op and one geometric op (`random_geometric`) in random order, then
    random erasing of erase_count[0]..erase_count[1] rectangles."""

    def __init__(
        self,
        min_sizes: Sequence[int],
        max_size: int,
        flip_prob: float = 0.5,
        max_rotate_deg: float = 30.0,
        max_translate: float = 0.1,
        max_shear_deg: float = 30.0,
        erase_count: tuple[int, int] = (1, 4),
        erase_scale: tuple[float, float] = (0.0, 0.2),
        photometric: bool = True,
        fill: float = GREY,
        resize_mode: str = "range",
    ) -> None:
        _check_sizes(min_sizes, max_size, resize_mode)
        self.min_sizes, self.max_size, self.resize_mode = tuple(min_sizes), max_size, resize_mode
        self.flip_prob, self.photometric, self.fill = flip_prob, photometric, fill
        self.max_rotate_deg, self.max_translate = max_rotate_deg, max_translate
        self.max_shear_deg = max_shear_deg
        self.erase_count, self.erase_scale = tuple(erase_count), tuple(erase_scale)

    def __call__(
        self, image: Image.Image | Tensor, generator: torch.Generator | None = None
    ) -> tuple[View, View]:
        """image: PIL or [3, H, W]. Returns (weak view for the teacher, strong view for
        the student); map teacher boxes with relative_matrix(weak.matrix, strong.matrix)."""
        image = to_float_image(image)
        sizes = (self.min_sizes, self.max_size, self.resize_mode, self.flip_prob, generator)
        weak_image, weak_matrix = random_resize_flip(image, *sizes)
        strong_image, strong_matrix = random_resize_flip(image, *sizes)
        geometric_first = _uniform(0, 1, generator) < 0.5
        if self.photometric and not geometric_first:
            strong_image = random_photometric(strong_image, generator)
        strong_image, step = random_geometric(
            strong_image, self.max_translate, self.max_rotate_deg, self.max_shear_deg,
            self.fill, generator,
        )
        if self.photometric and geometric_first:
            strong_image = random_photometric(strong_image, generator)
        strong_image = random_erase(
            strong_image, self.erase_count, self.erase_scale, self.fill, generator
        )
        return View(weak_image, weak_matrix), View(strong_image, step @ strong_matrix)


class EvalTransform:
    """Evaluation view: resize so the short side is `min_size`, long side <= `max_size`."""

    def __init__(self, min_size: int, max_size: int) -> None:
        _check_sizes([min_size], max_size, "choice")
        self.min_size, self.max_size = min_size, max_size

    def __call__(
        self, image: Image.Image | Tensor, target: dict | None = None
    ) -> tuple[Tensor, dict | None, Tensor]:
        """Returns (image [3, H', W'], target projected into it or None, matrix [3, 3]).
        Predictions map back to the original image with inverse(matrix)."""
        image, matrix = resize(to_float_image(image), self.min_size, self.max_size)
        if target is not None:
            target = project_target(target, matrix, image.shape[-1], image.shape[-2])
        return image, target, matrix
