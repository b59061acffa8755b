"""Pasting layers: boxes are tight on what stays visible after occlusion and truncation."""

import numpy as np
import pytest

from ssod.data.compose import Layer, composite, place, scaled, stamp, visible_box, visible_fractions
from ssod.data.instances import Cutout


def _square(side: int, value: int = 200) -> tuple[np.ndarray, np.ndarray]:
    return np.full((side, side, 3), value, dtype=np.uint8), np.ones((side, side), dtype=bool)


def test_a_truncated_and_occluded_layer_has_the_box_of_its_visible_part():
    owner = np.zeros((20, 30), dtype=np.int32)
    below = Layer(*_square(10), x=-4, y=5)  # columns -4..5: 4 outside the image
    above = Layer(*_square(10), x=0, y=10)  # covers rows 10..19 of columns 0..9
    stamp(owner, below, 1)
    stamp(owner, above, 2)
    box, visible = visible_box(owner, 1)
    assert box == (0, 5, 6, 5)
    assert visible.sum() == 30 and visible[5:10, 0:6].all()
    assert visible_box(owner, 2)[0] == (0, 10, 10, 10)
    assert visible_fractions(owner, [below, above]) == pytest.approx([0.3, 1.0])


def test_a_hole_in_the_mask_leaves_the_box_to_the_mask():
    owner = np.zeros((12, 12), dtype=np.int32)
    pixels, mask = _square(8)
    mask[:, :3] = False  # the left columns are not the object
    stamp(owner, Layer(pixels, mask, x=2, y=2), 1)
    assert visible_box(owner, 1)[0] == (5, 2, 5, 8)


def test_placement_keeps_every_layer_visible_enough_or_places_nothing():
    rng = np.random.default_rng(0)
    owner = np.zeros((40, 40), dtype=np.int32)
    layers, refused = [], 0
    for _ in range(30):
        layer = place(rng, owner, layers, *_square(16), min_visible=0.6)
        if layer is None:
            refused += 1
            continue
        layers.append(layer)
        assert (visible_fractions(owner, layers) >= 0.6).all()
    assert len(layers) >= 3 and refused > 0  # a crowded canvas refuses more
    truncated = any(layer.x < 0 or layer.y < 0 or layer.x + 16 > 40 or layer.y + 16 > 40 for layer in layers)
    assert truncated
    before = owner.copy()
    assert place(rng, owner, layers, *_square(60), min_visible=0.6) is None  # never 60% inside a 40 px image
    assert (owner == before).all()


def test_composite_paints_inside_the_mask_and_leaves_the_rest():
    canvas = np.zeros((30, 30, 3), dtype=np.float32)
    pixels, mask = _square(12, value=250)
    composite(canvas, [Layer(pixels, mask, x=10, y=10)])
    assert canvas[14:18, 14:18].min() > 240  # inside, away from the softened edge
    assert canvas[:5].max() == 0 and canvas[:, :5].max() == 0


def test_scaling_sets_the_side_caps_upscaling_and_mirrors():
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, :40] = 255
    cutout = Cutout(1, 1, 1, pixels, np.ones((20, 80), dtype=bool))
    scaled_pixels, scaled_mask = scaled(cutout, side=20.0, max_upscale=4.0, mirror=False)
    assert scaled_mask.shape == (10, 40) and scaled_pixels.shape == (10, 40, 3)
    assert scaled(cutout, side=400.0, max_upscale=2.0, mirror=False)[1].shape == (40, 160)
    mirrored = scaled(cutout, side=40.0, max_upscale=4.0, mirror=True)[0]
    assert mirrored[:, 0].max() == 0 and mirrored[:, -1].min() == 255
