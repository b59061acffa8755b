"""The gathered RoIAlign (ssod.models.roi_align) gives torchvision's values and gradients."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ssod.models.roi_align import PyramidRoIAlign, pyramid_roi_align

SHAPES = ((2, 3, 20, 13), (2, 3, 10, 7))  # two levels, odd sizes, more than one image
SCALES = (0.25, 0.125)


def _maps(generator_seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in SHAPES]


def _awkward_rois() -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes at every edge case of the bilinear rules, in (batch, x1, y1, x2, y2) pixels, and their levels."""
    boxes = torch.tensor(
        [
            [4.0, 6.0, 40.0, 70.0],  # inside
            [-20.0, -9.0, 30.0, 20.0],  # over the top-left border
            [30.0, 60.0, 90.0, 120.0],  # over the bottom-right border
            [-90.0, -90.0, -30.0, -20.0],  # wholly outside: zeros
            [10.0, 10.0, 10.5, 10.2],  # smaller than a cell: one cell wide and high
            [12.0, 12.0, 12.0, 12.0],  # empty
            [0.0, 0.0, 52.0, 80.0],  # exactly the map
            [51.0, 79.0, 52.0, 80.0],  # the last cell
            [3.3, 7.7, 25.1, 11.9],  # fractional
            [-4.0, -4.0, 20.0, 60.0],
            [-8.0, -8.0, 104.0, 104.0],  # level 0, 7x7 bins of 2x2: the first samples at exactly -1 cell
        ]
    )
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(40, 2, generator=generator) * 60 - 5
    boxes = torch.cat([boxes, torch.cat([corners, corners + torch.rand(40, 2, generator=generator) * 50], dim=1)])
    index = torch.arange(len(boxes))
    batch = ((index // 2) % 2).float()[:, None]  # every (image, level) pair
    levels = index % 2
    return torch.cat([batch, boxes], dim=1), levels


def _torchvision(maps, rois, levels, output_size, ratio):
    """Each box by torchvision's ``roi_align`` on its own level, in box order."""
    pooled = torch.zeros(len(rois), maps[0].shape[1], *output_size, dtype=maps[0].dtype)
    for level, (feature, scale) in enumerate(zip(maps, SCALES)):
        chosen = levels == level
        pooled = pooled.index_put((chosen,), roi_align(feature, rois[chosen], output_size, scale, ratio))
    return pooled


@pytest.mark.parametrize("output_size, ratio", [((7, 7), 2), ((5, 3), 1), ((2, 4), 3)])
def test_values_and_gradients_equal_torchvision(output_size, ratio):
    rois, levels = _awkward_rois()
    maps = _maps()
    expected = _torchvision(maps, rois, levels, output_size, ratio)
    actual = pyramid_roi_align(maps, rois, levels, list(SCALES), output_size, ratio)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert actual[3].abs().sum() == 0 and expected[0].abs().sum() > 0
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    expected_grads = torch.autograd.grad(expected, maps, cotangent)
    actual_grads = torch.autograd.grad(actual, maps, cotangent)
    for a, e in zip(actual_grads, expected_grads):
        assert e.abs().sum() > 0
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_no_boxes_and_non_finite_boxes():
    maps = _maps()
    empty = pyramid_roi_align(maps, torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), list(SCALES), (7, 7), 2)
    assert empty.shape == (0, 3, 7, 7)
    grads = torch.autograd.grad(empty.sum(), maps, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    rois, levels = _awkward_rois()
    broken = rois.clone()
    broken[0, 1:] = torch.tensor([float("nan"), 1.0, float("inf"), 5.0])
    pooled = pyramid_roi_align(maps, broken, levels, list(SCALES), (7, 7), 2)
    assert torch.isfinite(pooled).all() and pooled[0].abs().sum() == 0
    torch.testing.assert_close(pooled[1:], pyramid_roi_align(maps, rois, levels, list(SCALES), (7, 7), 2)[1:])


def test_outside_samples_pass_no_gradient_and_float64_stays_float64():
    """A box outside the map pools zeros and takes no gradient, not even a non-finite one
    (torchvision skips those samples); float64 maps are pooled in float64."""
    rois, levels = _awkward_rois()
    maps = [m.detach().double().requires_grad_() for m in _maps()]
    expected = _torchvision(maps, rois.double(), levels, (7, 7), 2)
    pooled = pyramid_roi_align(maps, rois, levels, list(SCALES), (7, 7), 2)
    assert pooled.dtype == torch.float64
    torch.testing.assert_close(pooled, expected.to(pooled.dtype), rtol=1e-12, atol=1e-12)
    cotangent = torch.zeros_like(pooled)
    cotangent[3] = float("nan")  # the box wholly outside
    grads = torch.autograd.grad(pooled, maps, cotangent)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_memory_format_and_ratio():
    rois, levels = _awkward_rois()
    maps = _maps()
    expected = pyramid_roi_align(maps, rois, levels, list(SCALES), (7, 7), 2)
    channels_last = [m.detach().to(memory_format=torch.channels_last) for m in maps]
    assert torch.equal(pyramid_roi_align(channels_last, rois, levels, list(SCALES), (7, 7), 2), expected)
    with pytest.raises(ValueError, match="fixed sampling ratio"):
        pyramid_roi_align(maps, rois, levels, list(SCALES), (7, 7), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooler_equals_multiscale_roi_align(dtype):
    """The detector's pooler against torchvision's MultiScaleRoIAlign: level mapping, dtype, values."""
    torch.manual_seed(0)
    features = {name: torch.randn(2, 4, size, size).to(dtype) for name, size in zip("0123", (176, 88, 44, 22))}
    boxes = []
    for count in (60, 0, 25):  # 1 to 600 px: every level gets boxes; an image without boxes
        corner = torch.rand(count, 2) * 100
        boxes.append(torch.cat([corner, corner + 1 + torch.rand(count, 1) * 600], dim=1))
    features = {name: torch.cat([f, f[:1]]).requires_grad_() for name, f in features.items()}  # three images
    sizes = [(704, 704), (704, 640), (600, 700)]
    results = []
    for pooler in (MultiScaleRoIAlign(list("0123"), 7, 2), PyramidRoIAlign(list("0123"), 7, 2)):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            pooled = pooler(features, boxes, sizes)
        cotangent = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(pooled)
        results.append((pooled, torch.autograd.grad(pooled, list(features.values()), cotangent)))
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.dtype == expected.dtype == dtype and actual.shape == (85, 4, 7, 7)
    # bfloat16: both compute in float32, whose sums differ in their last bits, which can
    # round to the neighbouring bfloat16.
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(actual, expected, **tolerance)
    for a, e in zip(actual_grads, expected_grads):
        assert e.abs().sum() > 0  # every level is used
        torch.testing.assert_close(a, e, **tolerance)


def test_pooler_keeps_torchvision_kernel_for_adaptive_sampling():
    torch.manual_seed(0)
    features = {"0": torch.randn(1, 2, 32, 32)}
    boxes = [torch.tensor([[2.0, 3.0, 60.0, 90.0], [10.0, 10.0, 20.0, 15.0]])]
    expected = MultiScaleRoIAlign(["0"], 7, -1)(features, boxes, [(128, 128)])
    assert torch.equal(PyramidRoIAlign(["0"], 7, -1)(features, boxes, [(128, 128)]), expected)
