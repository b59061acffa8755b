import math

import pytest
import torch

from ssod.models.boxes import (
    NUM_VOTES,
    best_overlap,
    box_iou,
    clip_boxes,
    decode_deltas,
    encode_deltas,
    jitter_boxes,
    paired_box_iou,
    valid_boxes_mask,
    vote_boxes,
)


def test_vote_boxes_exact_geometry():
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])  # w = 100, h = 50 -> dw = 6, dh = 3
    expected = torch.tensor(
        [
            [10.0, 20.0, 110.0, 70.0],  # the box itself
            [4.0, 17.0, 104.0, 67.0],  # shifted towards top-left
            [16.0, 17.0, 116.0, 67.0],  # towards top-right
            [4.0, 23.0, 104.0, 73.0],  # towards bottom-left
            [16.0, 23.0, 116.0, 73.0],  # towards bottom-right
            [4.0, 17.0, 116.0, 73.0],  # enlarged by frac
            [-2.0, 14.0, 122.0, 76.0],  # enlarged by 2 * frac
        ]
    )
    voted = vote_boxes(box, frac=0.06)
    assert voted.shape == (1, NUM_VOTES, 4)
    torch.testing.assert_close(voted[0], expected)


def test_vote_boxes_clamps_size_to_one_pixel_and_keeps_box_order():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.25], [10.0, 10.0, 20.0, 30.0]])
    voted = vote_boxes(boxes, frac=0.1)
    # w, h of the tiny box are clamped to 1 before scaling: offsets of 0.1 pixel.
    torch.testing.assert_close(voted[0, 5], torch.tensor([-0.1, -0.1, 0.6, 0.35]))
    torch.testing.assert_close(voted[1, 0], boxes[1])
    torch.testing.assert_close(voted[1, 4], torch.tensor([11.0, 12.0, 21.0, 32.0]))


def test_jitter_std_is_scale_times_width_for_x_and_height_for_y():
    box = torch.tensor([[50.0, 50.0, 150.0, 70.0]])  # w = 100, h = 20
    generator = torch.Generator().manual_seed(0)
    jittered = jitter_boxes(box, num=20000, scale=0.2, generator=generator)
    assert jittered.shape == (20000, 4)
    std = (jittered - box).std(dim=0)
    torch.testing.assert_close(std, torch.tensor([20.0, 4.0, 20.0, 4.0]), rtol=0.03, atol=0.0)
    assert (jittered - box).mean(dim=0).abs().max() < 0.5


def test_jitter_is_copy_major_and_reproducible():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1000.0, 1000.0, 1010.0, 1010.0]])
    first = jitter_boxes(boxes, num=3, scale=0.01, generator=torch.Generator().manual_seed(1))
    second = jitter_boxes(boxes, num=3, scale=0.01, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, second)
    source = torch.arange(2).repeat(3)
    assert (first - boxes[source]).abs().max() < 1.0
    assert jitter_boxes(boxes, num=0, scale=0.2).shape == (0, 4)


def test_encode_decode_round_trip():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 2, generator=generator) * 100
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(50, 2, generator=generator) * 50], dim=1)
    targets = boxes + torch.randn(50, 4, generator=generator) * 3
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 1)
    deltas = encode_deltas(boxes, targets)
    torch.testing.assert_close(decode_deltas(boxes, deltas), targets, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(decode_deltas(boxes, torch.zeros_like(deltas)), boxes)


def test_decode_known_deltas_and_clamp():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    shifted = decode_deltas(box, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    torch.testing.assert_close(shifted, torch.tensor([[5.0, -10.0, 15.0, 10.0]]))
    doubled = decode_deltas(box, torch.tensor([[0.0, 0.0, math.log(2.0), 0.0]]))
    torch.testing.assert_close(doubled, torch.tensor([[-5.0, 0.0, 15.0, 20.0]]))
    huge = decode_deltas(box, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    assert torch.isfinite(huge).all()
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-4)
    assert huge[0, 3] - huge[0, 1] == pytest.approx(20 * 16 / 1000, rel=1e-4)


def test_valid_boxes_mask_and_clip():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 0.0, 5.0, 3.0], [0.0, 4.0, 2.0, 3.0], [0.0, 0.0, 3.0, 3.0]])
    assert valid_boxes_mask(boxes).tolist() == [True, False, False, True]
    assert valid_boxes_mask(boxes, min_size=2).tolist() == [False, False, False, True]
    clipped = clip_boxes(torch.tensor([[-5.0, -5.0, 50.0, 80.0]]), (60, 40))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 40.0, 60.0]]))


def test_paired_iou_is_diagonal_of_matrix():
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(8, 2, generator=generator) * 10
    a = torch.cat([corner, corner + 1 + torch.rand(8, 2, generator=generator) * 10], dim=1)
    b = a + torch.randn(8, 4, generator=generator)
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.5)
    torch.testing.assert_close(paired_box_iou(a, b), box_iou(a, b).diagonal(), rtol=1e-5, atol=1e-6)


def test_best_overlap_with_and_without_gt():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    gt = torch.tensor([[20.0, 20.0, 30.0, 35.0], [0.0, 0.0, 10.0, 5.0]])
    iou, index = best_overlap(boxes, gt)
    torch.testing.assert_close(iou, torch.tensor([0.5, 10 / 15, 0.0]))
    assert index[:2].tolist() == [1, 0]
    iou, index = best_overlap(boxes, torch.zeros(0, 4))
    assert iou.tolist() == [0.0, 0.0, 0.0]
    assert index.dtype == torch.int64 and index.tolist() == [-1, -1, -1]
