"""Builders: the unsupervised weight's burn-in and ramp, and the method's pseudo-label source."""

import pytest

from ssod.build import build_loss_weights, build_model, unsup_weight_at
from ssod.config import MethodConfig, ModelConfig


def test_burn_in_then_linear_ramp_of_the_unsupervised_weight():
    method = MethodConfig(name="polish_teacher", unsup_weight=3.0, unsup_start=10, unsup_warmup=4)
    assert [unsup_weight_at(step, method) for step in (0, 9, 10, 11, 12, 13, 14, 1000)] == [
        0.0, 0.0, 0.75, 1.5, 2.25, 3.0, 3.0, 3.0]
    assert build_loss_weights(method, 5)["unsup/roi_cls"] == 0.0
    assert build_loss_weights(method, 11)["unsup/rpn_reg"] == 1.5
    assert build_loss_weights(method)["unsup/roi_reg"] == 3.0
    assert build_loss_weights(method, 11)["sup/roi_cls"] == 1.0
    plain = MethodConfig(name="soft_teacher", unsup_weight=4.0)
    assert unsup_weight_at(0, plain) == 4.0


def test_an_unknown_pseudo_label_source_is_refused():
    with pytest.raises(ValueError, match="method.pseudo_labels='gt'"):
        build_model(ModelConfig(arch="resnet18_fpn"), MethodConfig(name="soft_teacher", pseudo_labels="gt"), 2)
