"""ssod.methods: one class per method, chosen by name; the unsupervised weight's burn-in and
ramp; pseudo labels that do not depend on what the teacher pooled before (a resume)."""

import copy

import pytest
import torch

from ssod.config import MethodConfig, ModelConfig
from ssod.methods import METHODS, build_method
from ssod.methods.polish_teacher import PolishTeacher
from ssod.methods.soft_teacher import SoftTeacher
from ssod.methods.supervised import Supervised


def test_burn_in_then_linear_ramp_of_the_unsupervised_weight():
    method = build_method(MethodConfig(name="polish_teacher", unsup_weight=3.0, unsup_start=10, unsup_warmup=4))
    assert [method.schedule.unsup_weight_at(step) for step in (0, 9, 10, 11, 12, 13, 14, 1000)] == [
        0.0, 0.0, 0.75, 1.5, 2.25, 3.0, 3.0, 3.0]
    assert method.loss_weights(5)["unsup/roi_cls"] == 0.0
    assert method.loss_weights(11)["unsup/rpn_reg"] == 1.5
    assert method.loss_weights()["unsup/roi_reg"] == 3.0
    assert method.loss_weights(11)["sup/roi_cls"] == 1.0
    assert [method.semi_supervised_at(step) for step in (9, 10)] == [False, True]
    plain = build_method(MethodConfig(name="soft_teacher", unsup_weight=4.0))
    assert plain.schedule.unsup_weight_at(0) == 4.0


def test_the_name_chooses_the_class_and_only_polishing_teacher_has_polishing_networks():
    assert METHODS == {"supervised": Supervised, "soft_teacher": SoftTeacher, "polish_teacher": PolishTeacher}
    model = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32)
    for name, polisher in (("supervised", False), ("soft_teacher", False), ("polish_teacher", True)):
        method = build_method(MethodConfig(name=name, polish_hidden=16))
        assert type(method) is METHODS[name] and method.needs_unlabeled == (name != "supervised")
        assert (method.build_model(model, 3).polisher is not None) == polisher
    assert not build_method(MethodConfig(name="supervised", unsup_start=0)).semi_supervised_at(100)


def test_a_method_reads_its_own_settings_only():
    cfg = MethodConfig(name="soft_teacher", reg_uncertainty_thr=0.03, cls_pseudo_threshold=0.8, ema_momentum=0.99)
    soft = build_method(cfg)
    assert (soft.jitter.threshold, soft.thresholds.cls, soft.ema.momentum) == (0.03, 0.8, 0.99)
    assert not hasattr(soft, "polish")
    assert build_method(MethodConfig(name="polish_teacher", rf_cls_thr=0.7)).polish.rf_cls_thr == 0.7


@pytest.mark.parametrize("cfg, message", [
    (MethodConfig(name="soft_teacher", pseudo_labels="gt"), "method.pseudo_labels='gt'"),
    (MethodConfig(name="mean_teacher"), "method.name='mean_teacher'"),
])
def test_an_unknown_method_or_pseudo_label_source_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_method(cfg)


def test_the_teachers_pseudo_labels_do_not_depend_on_what_it_pooled_before():
    """Polishing Teacher's teacher sees labeled images and weak views in one batch and pools
    the weak part alone, whose features are padded to the larger labeled image. A resumed
    process's teacher does that first; its pseudo labels must be those of the uninterrupted
    run's teacher, which had pooled whole batches before (an evaluation, say)."""
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="polish_teacher", polish_hidden=16, reg_samples=4, cls_samples=[2, 2],
                                       pseudo_label_initial_score_thr=0.0))
    model = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128])
    fresh = method.build_model(model, 3).requires_grad_(False).eval()
    warm = copy.deepcopy(fresh)
    labeled = [torch.rand(3, 160, 160)]
    targets = [{"boxes": torch.tensor([[20.0, 30, 90, 120]]), "labels": torch.tensor([1])}]
    weak = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        warm.detector(labeled)
    outputs = []
    for teacher in (fresh, warm):
        torch.manual_seed(1)
        outputs.append(method.teach(teacher, labeled, targets, weak).pseudo_labels[0])
    fresh_labels, warm_labels = outputs
    assert len(warm_labels.boxes) > 0
    torch.testing.assert_close(fresh_labels.boxes, warm_labels.boxes)
    torch.testing.assert_close(fresh_labels.reg_boxes, warm_labels.reg_boxes)
    assert torch.equal(fresh_labels.cls_labels, warm_labels.cls_labels)
