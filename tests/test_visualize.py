"""Pseudo-label pictures: three titled panels of the weak view."""

from __future__ import annotations

import numpy as np
import torch

from ssod.visualize import PANEL_SIZE, TITLE_HEIGHT, panel_scale, pseudo_label_picture


def test_the_picture_has_three_enlarged_panels_each_under_its_title():
    image = torch.zeros(3, 40, 50)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0]])
    picture = pseudo_label_picture(image, boxes, torch.tensor([1]), boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long),
                                   boxes, torch.tensor([2]), ("circle", "square"))
    scale = panel_scale(40, 50)
    assert scale == 10 and 50 * scale >= PANEL_SIZE  # a small view, enlarged so that its boxes can be read
    width = 50 * scale
    assert picture.size == (3 * width, 40 * scale + TITLE_HEIGHT)
    pixels = np.asarray(picture)
    band, panels = pixels[:TITLE_HEIGHT], pixels[TITLE_HEIGHT:]
    for index in range(3):  # every title band holds text (non-white pixels), the empty panel too
        assert (band[:, index * width : (index + 1) * width] < 200).any(), index
    assert (panels[:, width : 2 * width] == 0).all()  # no raw pseudo label: the middle panel is the bare image
    assert panels[:, :width, 1].max() > 0 and panels[:, 2 * width :, 2].max() > 0  # green ground truth, blue polished
    # The box is drawn where it is, enlarged: its left edge at x = 5 * scale, its inside untouched.
    assert panels[20 * scale, 5 * scale, 1] > 0 and (panels[10 * scale : 28 * scale, 10 * scale : 28 * scale] == 0).all()
    assert panel_scale(600, 800) == 1  # a large image stays as it is


def test_detections_are_drawn_a_colour_per_class_with_labels_outside_their_boxes():
    from PIL import Image

    from ssod.visualize import detection_picture

    grey = Image.new("RGB", (200, 160), (128, 128, 128))
    boxes = torch.tensor([[20.0, 40.0, 80.0, 100.0], [110.0, 0.0, 190.0, 70.0]])  # the second touches the top
    colours = [(255, 0, 0), (0, 0, 255)]
    picture = np.asarray(detection_picture(grey, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]),
                                           ("cat", "dog"), colours))
    assert tuple(picture[70, 20]) == (255, 0, 0) and tuple(picture[70, 150]) == (0, 0, 255)  # left, bottom edges
    # Inside each box the image is untouched: the label sits outside.
    assert (picture[42:98, 22:78] == 128).all() and (picture[2:68, 112:188] == 128).all()
    # The first label on a red band right above its box; the second below its box.
    assert (picture[30:38, 22:30] == (255, 0, 0)).all(axis=-1).any()
    assert (picture[72:80, 112:120] == (0, 0, 255)).all(axis=-1).any()
