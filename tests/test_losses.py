"""Detector losses: empty pseudo labels, background weighting, loss weighting."""

import pytest
import torch

from ssod.config import ModelConfig
from ssod.losses import loss_weights, supervised_losses, unsupervised_losses, weighted_total
from ssod.models.detector import build_detector

TINY = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128],
                   rpn_batch_size_per_image=32, box_batch_size_per_image=32)


@pytest.fixture(scope="module")
def detector_and_features():
    torch.manual_seed(0)
    detector = build_detector(TINY, num_classes=3).train()
    images, _ = detector.transform([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    features = detector.backbone(images.tensors)
    return detector, images, features


def _empty():
    return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}


def _targets(n_images, boxes=None):
    if boxes is None:
        return [_empty() for _ in range(n_images)]
    return [{"boxes": boxes.clone(), "labels": torch.ones(len(boxes), dtype=torch.int64)} for _ in range(n_images)]


def test_no_pseudo_labels_gives_zero_box_losses(detector_and_features):
    detector, images, features = detector_and_features
    empty = {"rpn": _targets(2), "cls": _targets(2), "reg": _targets(2)}
    losses = unsupervised_losses(detector, images, features, empty)
    assert losses["unsup/rpn_reg"].item() == 0.0
    assert losses["unsup/roi_reg"].item() == 0.0
    assert losses["unsup/roi_cls"].item() > 0.0  # everything is background, still learned
    assert all(torch.isfinite(v) for v in losses.values())
    weighted_total(losses, loss_weights(3.0)).backward()  # no crash, gradients flow


def test_pseudo_labels_give_box_losses(detector_and_features):
    detector, images, features = detector_and_features
    boxes = torch.tensor([[10.0, 10, 40, 40]])
    targets = {"rpn": _targets(2, boxes), "cls": _targets(2, boxes), "reg": _targets(2, boxes)}
    losses = unsupervised_losses(detector, images, features, targets)
    assert losses["unsup/roi_reg"].item() > 0.0
    assert losses["unsup/rpn_reg"].item() > 0.0


def test_background_weighting_scales_negatives(detector_and_features):
    detector, images, features = detector_and_features
    boxes = torch.tensor([[10.0, 10, 40, 40]])
    targets = {"rpn": _targets(2, boxes), "cls": _targets(2, boxes), "reg": _targets(2, boxes)}
    calls = []

    def zero_background(proposals):
        calls.append([p.shape[0] for p in proposals])
        return [torch.zeros(p.shape[0]) for p in proposals]

    def one_background(proposals):
        return [torch.ones(p.shape[0]) for p in proposals]

    torch.manual_seed(1)
    unweighted = unsupervised_losses(detector, images, features, targets, one_background)["unsup/roi_cls"]
    torch.manual_seed(1)
    plain = unsupervised_losses(detector, images, features, targets, None)["unsup/roi_cls"]
    torch.manual_seed(1)
    positives_only = unsupervised_losses(detector, images, features, targets, zero_background)["unsup/roi_cls"]
    assert calls and all(n > 0 for n in calls[0])  # called with the sampled proposals
    assert torch.allclose(unweighted, plain)  # weight 1 everywhere == plain mean
    assert not torch.allclose(positives_only, plain)  # negatives dropped: a different mean


def test_supervised_losses_keys(detector_and_features):
    detector, images, features = detector_and_features
    losses = supervised_losses(detector, images, features, _targets(2, torch.tensor([[5.0, 5, 30, 50]])))
    assert set(losses) == {"sup/rpn_cls", "sup/rpn_reg", "sup/roi_cls", "sup/roi_reg"}


def test_weighted_total_applies_weights_and_refuses_unweighted_losses():
    losses = {"sup/roi_cls": torch.tensor(2.0), "unsup/roi_cls": torch.tensor(1.0)}
    weights = loss_weights(unsup_weight=3.0)
    assert weighted_total(losses, weights).item() == pytest.approx(5.0)
    with pytest.raises(KeyError, match="without a weight"):
        weighted_total({"mystery": torch.tensor(1.0)}, weights)


def test_single_roi_pass_equals_separate_passes(detector_and_features):
    """The merged cls+reg RoI pass (a speed-up) gives the losses of two separate passes."""
    import torch.nn.functional as F

    from ssod.losses import _box_outputs, box_regression_loss

    detector, images, features = detector_and_features
    boxes = torch.tensor([[10.0, 10, 40, 40], [30, 5, 60, 25]])
    targets = {"rpn": _targets(2, boxes), "cls": _targets(2, boxes[:1]), "reg": _targets(2, boxes + 2)}
    torch.manual_seed(7)
    merged = unsupervised_losses(detector, images, features, targets)

    torch.manual_seed(7)
    heads = detector.roi_heads
    proposals, _ = detector.rpn(images, features, targets["rpn"])
    proposals = [p.detach() for p in proposals]
    cls_props, _, cls_labels, _ = heads.select_training_samples(proposals, targets["cls"])
    reg_props, _, reg_labels, reg_deltas = heads.select_training_samples(proposals, targets["reg"])
    logits, _ = _box_outputs(detector, features, cls_props, images.image_sizes)
    _, regression = _box_outputs(detector, features, reg_props, images.image_sizes)
    expected_cls = F.cross_entropy(logits, torch.cat(cls_labels))
    labels = torch.cat(reg_labels)
    expected_reg = box_regression_loss(regression, labels, torch.cat(reg_deltas), labels.numel())
    assert torch.allclose(merged["unsup/roi_cls"], expected_cls, rtol=1e-5, atol=1e-6)
    assert torch.allclose(merged["unsup/roi_reg"], expected_reg, rtol=1e-5, atol=1e-6)


def test_box_regression_loss_without_any_sample_is_zero_and_connected():
    """A batch whose images got no proposal at all (possible early on, or in fp16) must not crash."""
    from ssod.losses import box_regression_loss

    box_regression = torch.zeros((0, 4 * 4), requires_grad=True)
    loss = box_regression_loss(box_regression, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 0)
    loss.backward()
    assert loss.item() == 0.0 and box_regression.grad is not None
