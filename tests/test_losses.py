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


def _separate_passes(detector, images, features, count, targets, pseudo, background):
    """The losses as computed before the single pass: torchvision's RPN forward and one RoI
    pass per group, and a second RoI pass for every regression sample of the strong views."""
    import torch.nn.functional as F
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    from ssod.losses import box_outputs, box_regression_loss

    heads = detector.roi_heads
    sizes = images.image_sizes
    head = ImageList(images.tensors[:count], sizes[:count]), {k: v[:count] for k, v in features.items()}
    tail = ImageList(images.tensors[count:], sizes[count:]), {k: v[count:] for k, v in features.items()}
    proposals, rpn = detector.rpn(*head, targets)
    proposals, _, labels, deltas = heads.select_training_samples(proposals, targets)
    logits, regression = box_outputs(detector, head[1], proposals, sizes[:count])
    losses = dict(zip(("sup/roi_cls", "sup/roi_reg"), fastrcnn_loss(logits, regression, labels, deltas)))
    losses.update({"sup/rpn_cls": rpn["loss_objectness"], "sup/rpn_reg": rpn["loss_rpn_box_reg"]})
    proposals, rpn = detector.rpn(*tail, pseudo["rpn"])
    proposals = [p.detach() for p in proposals]
    cls_props, _, cls_labels, _ = heads.select_training_samples(proposals, pseudo["cls"])
    reg_props, _, reg_labels, reg_deltas = heads.select_training_samples(proposals, pseudo["reg"])
    logits, _ = box_outputs(detector, tail[1], cls_props, sizes[count:])
    _, regression = box_outputs(detector, tail[1], reg_props, sizes[count:])
    labels = torch.cat(cls_labels)
    weights = torch.where(labels == 0, torch.cat(background(cls_props)), torch.ones_like(labels, dtype=logits.dtype))
    losses["unsup/roi_cls"] = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()
    labels = torch.cat(reg_labels)
    losses["unsup/roi_reg"] = box_regression_loss(regression, labels, torch.cat(reg_deltas), labels.numel())
    losses.update({"unsup/rpn_cls": rpn["loss_objectness"], "unsup/rpn_reg": rpn["loss_rpn_box_reg"]})
    return losses


def test_one_pass_over_labeled_and_strong_images_equals_separate_passes():
    """One RPN and one RoI pass for the whole batch (a speed-up) gives the losses and the
    gradients of separate passes per group, with the same random sampling."""
    from ssod.losses import detector_losses

    torch.manual_seed(0)
    detector = build_detector(TINY, num_classes=3).train()
    images, _ = detector.transform([torch.rand(3, 64, 80), torch.rand(3, 72, 64), torch.rand(3, 56, 64), torch.rand(3, 64, 64)])
    features = detector.backbone(images.tensors)
    boxes = torch.tensor([[10.0, 10, 40, 40], [30, 5, 60, 25], [2, 30, 20, 60]])
    targets = [{"boxes": boxes[:2], "labels": torch.tensor([1, 2])}, {"boxes": boxes[2:], "labels": torch.tensor([3])}]
    pseudo = {"rpn": _targets(2, boxes), "cls": [_targets(1, boxes[:1])[0], _empty()], "reg": _targets(2, boxes + 2)}

    def background(proposals):  # any fixed function of the boxes will do
        return [torch.sigmoid(p[:, 0] / 10 - p[:, 3] / 20) for p in proposals]

    results = []
    for losses_of in (detector_losses, None):
        torch.manual_seed(7)
        detector.zero_grad(set_to_none=True)
        if losses_of is None:
            losses = _separate_passes(detector, images, features, 2, targets, pseudo, background)
        else:
            losses = losses_of(detector, images, features, targets, pseudo, background)
        sum(losses.values()).backward(retain_graph=True)
        grads = {n: p.grad.clone() for n, p in detector.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (one, one_grads), (separate, separate_grads) = results
    assert one.keys() == separate.keys() and len(one) == 8
    assert one["unsup/roi_reg"] > 0 and one["sup/roi_reg"] > 0  # the regression paths are exercised
    for name in one:
        torch.testing.assert_close(one[name], separate[name], rtol=1e-5, atol=1e-6, msg=name)
    assert one_grads.keys() == separate_grads.keys()
    for name in one_grads:
        torch.testing.assert_close(one_grads[name], separate_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_box_regression_loss_without_any_sample_is_zero_and_connected():
    """A batch whose images got no proposal at all (possible early on, or in fp16) must not crash."""
    from ssod.losses import box_regression_loss

    box_regression = torch.zeros((0, 4 * 4), requires_grad=True)
    loss = box_regression_loss(box_regression, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 0)
    loss.backward()
    assert loss.item() == 0.0 and box_regression.grad is not None
