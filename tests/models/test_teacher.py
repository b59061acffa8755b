"""EMA teacher: the momentum formula, the update rule, and pseudo-label targets."""

import math

import pytest
import torch
from torch import nn

from ssod.models.teacher import PseudoLabels, ema_momentum, ema_update


@pytest.mark.parametrize(
    ("step", "max_momentum", "warmup", "expected"),
    [
        (0, 0.999, 0, 0.0),  # first step copies the student
        (1, 0.999, 0, 0.5),
        (9, 0.999, 0, 0.9),
        (999, 0.999, 0, 0.999),
        (5000, 0.999, 0, 0.999),  # capped
        (0, 0.99, 100, 0.0),
        (101, 0.99, 100, 0.5),  # 1 - 101/202
        (909, 0.99, 100, 0.9),  # 1 - 101/1010
        (20000, 0.99, 100, 0.99),
    ],
)
def test_ema_momentum_reference_warmup(step, max_momentum, warmup, expected):
    assert math.isclose(ema_momentum(step, max_momentum, warmup), expected, abs_tol=1e-12)


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student[1].running_mean.fill_(5.0)
    return teacher, student


def test_ema_update_parameters_only_by_default():
    teacher, student = _pair()
    before = teacher[0].weight.clone()
    ema_update(teacher, student, momentum=0.75)
    assert torch.allclose(teacher[0].weight, 0.75 * before + 0.25 * student[0].weight)
    assert torch.equal(teacher[1].running_mean, torch.zeros(2))  # buffers untouched


def test_ema_update_with_buffers_copies_them():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=0.75, include_buffers=True)
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 5.0))


def test_ema_momentum_zero_copies_student():
    teacher, student = _pair()
    ema_update(teacher, student, momentum=0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)


def test_pseudo_label_targets_are_disentangled():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]])
    labels = torch.tensor([1, 2, 3])
    scores = torch.tensor([0.95, 0.6, 0.8])
    polished = boxes + 1.0
    pseudo = PseudoLabels(
        boxes, labels, scores, polished,
        reg_keep=torch.tensor([True, True, False]),
        cls_keep=torch.tensor([True, False, True]),
        cls_labels=torch.tensor([1, 2, 5]),
    )
    cls = pseudo.classification_target(score_thr=0.7)
    assert torch.equal(cls["boxes"], boxes[[0, 2]])  # raw boxes, polished labels
    assert torch.equal(cls["labels"], torch.tensor([1, 5]))
    assert torch.equal(pseudo.classification_target(score_thr=0.9)["labels"], torch.tensor([1]))
    reg = pseudo.regression_target()
    assert torch.equal(reg["boxes"], polished[:2])  # polished boxes, detector labels
    assert torch.equal(reg["labels"], torch.tensor([1, 2]))
