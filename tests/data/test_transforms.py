"""Contracts of ssod.data.transforms: boxes, matrices and pixels agree."""

import pytest
import torch
from PIL import Image

from ssod.data.transforms import (
    PHOTOMETRIC_OPS,
    EvalTransform,
    LabeledTransform,
    WeakStrongTransform,
    hflip,
    photometric_op,
    project_boxes,
    project_target,
    random_erase,
    random_geometric,
    relative_matrix,
    resize,
    rotate,
    shear,
    translate,
)

BOX = torch.tensor([[10.0, 20.0, 30.0, 40.0]])


def white_box_image(height: int, width: int, box: list[int]) -> torch.Tensor:
    """Black [3, H, W] image with a white rectangle covering xyxy `box` (integer pixels)."""
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image


def bright_box(image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """xyxy box [4] enclosing the pixels brighter than `threshold` (pixel i spans [i, i+1])."""
    ys, xs = torch.nonzero(image[0] > threshold, as_tuple=True)
    assert len(xs) > 0, "the object left the image"
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flip_box_known_answer():
    image = white_box_image(50, 100, [10, 20, 30, 40])
    flipped, matrix = hflip(image)
    boxes, keep = project_boxes(BOX, matrix, 100, 50)
    assert keep.tolist() == [True]
    assert boxes.tolist() == [[70.0, 20.0, 90.0, 40.0]]
    assert bright_box(flipped).tolist() == [70.0, 20.0, 90.0, 40.0]


@pytest.mark.parametrize(
    "angle, expected",
    # Counter-clockwise as displayed: the upper-left box goes to the lower left, and back.
    [(90.0, [20.0, 70.0, 40.0, 90.0]), (-90.0, [60.0, 10.0, 80.0, 30.0])],
)
def test_rotate_90_box_known_answer(angle, expected):
    image = white_box_image(100, 100, [10, 20, 30, 40])
    rotated, matrix = rotate(image, angle, fill=0.0)
    boxes, _ = project_boxes(BOX, matrix, 100, 100)
    torch.testing.assert_close(boxes, torch.tensor([expected]), atol=1e-4, rtol=0)
    assert bright_box(rotated).tolist() == expected


def test_flip_then_rotate_composes_by_left_multiplication():
    image = white_box_image(100, 100, [10, 20, 30, 40])
    flipped, flip_matrix = hflip(image)
    rotated, rotate_matrix = rotate(flipped, 90.0, fill=0.0)
    boxes, _ = project_boxes(BOX, rotate_matrix @ flip_matrix, 100, 100)
    # Flip: [70, 20, 90, 40]; rotating that by 90 degrees: [20, 10, 40, 30].
    torch.testing.assert_close(boxes, torch.tensor([[20.0, 10.0, 40.0, 30.0]]), atol=1e-4, rtol=0)
    assert bright_box(rotated).tolist() == [20.0, 10.0, 40.0, 30.0]


def test_shear_known_answer_x_then_y():
    image = white_box_image(100, 100, [10, 20, 30, 40])
    sheared, matrix = shear(image, 45.0, 0.0, fill=0.0)
    # x += (y - 50): corners x in [10, 30], y in [20, 40] give x in [-20, 20], clipped at 0.
    boxes, _ = project_boxes(BOX, matrix, 100, 100)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 20.0, 20.0, 40.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(bright_box(sheared), boxes[0], atol=1.0, rtol=0)
    # Both: x first (60, 50) -> (60, 50), then y += (x - 50) -> (60, 60).
    _, matrix = shear(image, 45.0, 45.0)
    point = matrix @ torch.tensor([60.0, 50.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(point, torch.tensor([60.0, 60.0, 1.0], dtype=torch.float64))


def test_relative_matrix_round_trip_through_flip_scale_rotate():
    image = torch.zeros(3, 60, 80)
    teacher_image, teacher_scale = resize(image, 90, 1000)
    teacher_image, teacher_flip = hflip(teacher_image)
    teacher_matrix = teacher_flip @ teacher_scale
    student_image, student_scale = resize(image, 45, 1000)
    student_image, student_rotate = rotate(student_image, 17.0)
    student_matrix = student_rotate @ student_scale
    relative = relative_matrix(teacher_matrix, student_matrix)
    torch.testing.assert_close(relative @ teacher_matrix, student_matrix)
    torch.testing.assert_close(relative_matrix(student_matrix, teacher_matrix) @ relative,
                               torch.eye(3, dtype=torch.float64))
    boxes = torch.tensor([[10.0, 12.0, 30.0, 40.0], [40.0, 5.0, 70.0, 25.0]])
    teacher_height, teacher_width = teacher_image.shape[-2:]
    student_height, student_width = student_image.shape[-2:]
    teacher_boxes, _ = project_boxes(boxes, teacher_matrix, teacher_width, teacher_height)
    assert not torch.allclose(teacher_boxes, boxes)
    # Teacher view -> student view equals original -> student view directly.
    via_teacher, _ = project_boxes(teacher_boxes, relative, student_width, student_height)
    direct, _ = project_boxes(boxes, student_matrix, student_width, student_height)
    torch.testing.assert_close(via_teacher, direct, atol=1e-3, rtol=0)


def test_degenerate_boxes_are_dropped_with_the_mask():
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # stays
            [20.0, 20.0, 20.0, 35.0],  # zero width
            [80.0, 10.0, 95.0, 30.0],  # pushed off the canvas by the shift
            [59.5, 10.0, 70.0, 30.0],  # clipped to a 0.5-pixel sliver
            [float("nan"), 1.0, 5.0, 5.0],
        ]
    )
    _, matrix = translate(torch.zeros(3, 50, 100), 40.0, 0.0)
    kept, keep = project_boxes(boxes, matrix, 100, 50)
    assert keep.tolist() == [True, False, False, False, False]
    assert kept.tolist() == [[50.0, 10.0, 70.0, 30.0]]
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3, 4, 5]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
        "image_id": 7,
    }
    projected = project_target(target, matrix, 100, 50)
    assert projected["labels"].tolist() == [1]
    assert projected["scores"].tolist() == pytest.approx([0.9])
    assert projected["image_id"] == 7
    assert target["boxes"].shape == (5, 4), "the input target must not change"


def test_labeled_transform_drops_degenerate_boxes_with_labels():
    transform = LabeledTransform([30], 1000, flip_prob=0.0, photometric=False)
    image = Image.new("RGB", (80, 60), color=(255, 0, 0))
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [5.0, 5.0, 5.5, 20.0]]),
              "labels": torch.tensor([3, 4])}
    view, projected, matrix = transform(image, target)
    assert view.dtype == torch.float32 and view.shape == (3, 30, 40)
    assert view[0].min() == 1.0 and view[1].max() == 0.0
    assert projected["labels"].tolist() == [3]
    torch.testing.assert_close(projected["boxes"], torch.tensor([[5.0, 5.0, 20.0, 25.0]]))
    torch.testing.assert_close(matrix, torch.diag(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)))


OBJECT = [25, 20, 50, 40]


@pytest.mark.parametrize(
    "step",
    [
        lambda image: translate(image, 7.3, 0.0, fill=0.0),
        lambda image: translate(image, 0.0, -5.6, fill=0.0),
        lambda image: rotate(image, 23.0, fill=0.0),
        lambda image: shear(image, 15.0, -10.0, fill=0.0),
    ]
    + [
        lambda image, seed=seed: random_geometric(
            image, fill=0.0, generator=torch.Generator().manual_seed(seed)
        )
        for seed in range(8)
    ],
)
def test_geometric_matrix_matches_pixels(step):
    image = white_box_image(60, 80, OBJECT)
    warped, matrix = step(image)
    assert warped.shape == image.shape
    boxes, keep = project_boxes(torch.tensor([OBJECT], dtype=torch.float32), matrix, 80, 60)
    assert keep.tolist() == [True]
    assert not torch.equal(warped, image)
    torch.testing.assert_close(bright_box(warped), boxes[0], atol=2.0, rtol=0)


def test_geometric_fill_covers_uncovered_pixels():
    warped, _ = translate(torch.zeros(3, 20, 30), 10.0, 0.0, fill=0.5)
    assert torch.allclose(warped[:, :, :10], torch.tensor(0.5))
    assert torch.allclose(warped[:, :, 10:], torch.tensor(0.0))


@pytest.mark.parametrize("seed", range(6))
def test_weak_and_strong_views_place_the_object_consistently(seed):
    transform = WeakStrongTransform([40, 90], 200, photometric=False, erase_count=(0, 0), fill=0.0)
    image = white_box_image(60, 80, OBJECT)
    weak, strong = transform(image, generator=torch.Generator().manual_seed(seed))
    original_box = torch.tensor([OBJECT], dtype=torch.float32)
    weak_height, weak_width = weak.image.shape[-2:]
    strong_height, strong_width = strong.image.shape[-2:]
    weak_box, _ = project_boxes(original_box, weak.matrix, weak_width, weak_height)
    torch.testing.assert_close(bright_box(weak.image), weak_box[0], atol=2.0, rtol=0)
    # What the teacher sees in the weak view lands where the student sees it.
    relative = relative_matrix(weak.matrix, strong.matrix)
    strong_box, keep = project_boxes(bright_box(weak.image)[None], relative, strong_width, strong_height)
    assert keep.tolist() == [True]
    torch.testing.assert_close(bright_box(strong.image), strong_box[0], atol=3.0, rtol=0)


def test_views_are_independent_draws_and_reproducible_with_a_generator():
    transform = WeakStrongTransform([40, 90], 200)
    image = torch.rand(3, 60, 80)
    first = transform(image, generator=torch.Generator().manual_seed(3))
    again = transform(image, generator=torch.Generator().manual_seed(3))
    for view, same in zip(first, again):
        assert torch.equal(view.image, same.image) and torch.equal(view.matrix, same.matrix)
    # As in Soft Teacher, each view draws its own resize (and flip).
    pairs = [transform(image, generator=torch.Generator().manual_seed(seed)) for seed in range(10)]
    assert any(weak.image.shape != strong.image.shape for weak, strong in pairs)
    for view in first:
        assert view.image.dtype == torch.float32 and view.matrix.dtype == torch.float64
        assert 0.0 <= view.image.min() and view.image.max() <= 1.0


def test_resize_respects_min_and_max_sizes():
    image = torch.zeros(3, 50, 100)
    resized, matrix = resize(image, 40, 1000)
    assert resized.shape == (3, 40, 80)
    torch.testing.assert_close(matrix, torch.diag(torch.tensor([0.8, 0.8, 1.0], dtype=torch.float64)))
    capped, _ = resize(image, 40, 60)
    assert capped.shape == (3, 30, 60)
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        view, _, _ = LabeledTransform([30, 45], 80)(image, {"boxes": BOX, "labels": torch.tensor([1])},
                                                   generator=generator)
        assert 30 <= min(view.shape[-2:]) <= 45 and max(view.shape[-2:]) <= 80
        view, _, _ = LabeledTransform([32, 36], 1000, resize_mode="choice")(
            image, {"boxes": BOX, "labels": torch.tensor([1])}, generator=generator
        )
        assert min(view.shape[-2:]) in (32, 36)
    evaluated, target, matrix = EvalTransform(25, 1000)(image, {"boxes": BOX})
    assert evaluated.shape == (3, 25, 50)
    assert target["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0]]


@pytest.mark.parametrize(
    "arguments", [([400, 600, 800], 1333, "range"), ([], 1333, "choice"), ([800], 0, "range"),
                  ([800], 1333, "randomly")]
)
def test_bad_sizes_are_rejected(arguments):
    min_sizes, max_size, resize_mode = arguments
    with pytest.raises(ValueError):
        LabeledTransform(min_sizes, max_size, resize_mode=resize_mode)


@pytest.mark.parametrize("name", [name for name in PHOTOMETRIC_OPS if name != "identity"])
def test_photometric_ops_change_pixels_within_range(name):
    image = 0.2 + 0.4 * torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    changed = photometric_op(image, name, level=2)
    assert changed.shape == image.shape and changed.dtype == torch.float32
    assert 0.0 <= changed.min() and changed.max() <= 1.0
    assert not torch.allclose(changed, image, atol=1e-3)


def test_random_erase_fills_rectangles_without_touching_the_input():
    image = torch.zeros(3, 40, 50)
    erased = random_erase(image, count=(2, 2), scale=(0.2, 0.2), fill=0.5)
    assert image.max() == 0.0
    filled = (erased[0] == 0.5).sum().item()
    assert 8 * 10 <= filled <= 2 * 8 * 10
