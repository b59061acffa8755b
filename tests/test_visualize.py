"""Pseudo-label pictures: three titled panels of the weak view."""

from __future__ import annotations

import numpy as np
import torch

from ssod.visualize import TITLE_HEIGHT, pseudo_label_picture


def test_the_picture_has_three_panels_each_under_its_title():
    image = torch.zeros(3, 40, 50)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0]])
    picture = pseudo_label_picture(image, boxes, torch.tensor([1]), boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long),
                                   boxes, torch.tensor([2]), ("circle", "square"))
    assert picture.size == (150, 40 + TITLE_HEIGHT)
    pixels = np.asarray(picture)
    band, panels = pixels[:TITLE_HEIGHT], pixels[TITLE_HEIGHT:]
    for index in range(3):  # every title band holds text (non-white pixels), the empty panel too
        assert (band[:, index * 50 : (index + 1) * 50] < 200).any(), index
    assert (panels[:, 50:100] == 0).all()  # no raw pseudo label: the middle panel is the bare image
    assert panels[:, :50, 1].max() > 0 and panels[:, 100:, 2].max() > 0  # green ground truth, blue polished
