"""ssod.models.rcnn: each part gives torchvision's values, with fewer waits for the GPU."""

import copy

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from ssod.config import ModelConfig
from ssod.models.detector import build_detector
from ssod.models.rcnn import OneWaitRoIHeads, OneWaitRPN, OneWaitSampler

# CI has no GPU; experiments/gpu_check.sh runs these on one too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _matched(seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """Match results of three images: plenty of both, no positive at all, few negatives."""
    generator = torch.Generator().manual_seed(seed)
    plenty = torch.randint(-1, 4, (300,), generator=generator)
    no_positive = torch.randint(-1, 1, (200,), generator=generator)
    few_negatives = torch.where(torch.rand(150, generator=generator) < 0.05, 0, 2)
    return [m.to(device) for m in (plenty, no_positive, few_negatives)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_wait_sampler_draws_torchvision_samples(seed, device):
    matched = _matched(seed, device)
    results = []
    for sampler in (BalancedPositiveNegativeSampler(64, 0.25), OneWaitSampler(64, 0.25)):
        torch.manual_seed(seed)
        results.append(sampler(matched))
        results.append(torch.rand(1, device=device))  # the RNG is left where torchvision leaves it
    (expected, after_expected), (actual, after_actual) = results[:2], results[2:]
    for expected_masks, actual_masks in zip(expected, actual):
        assert all(torch.equal(e, a) for e, a in zip(expected_masks, actual_masks))
    assert torch.equal(after_expected, after_actual)
    assert [int(m.sum()) for m in actual[0]] == [16, 0, 16] and int(actual[1][2].sum()) < 48


@pytest.mark.parametrize("device", DEVICES)
def test_one_wait_rpn_loss_and_roi_subsampling_equal_torchvision(device):
    matched = _matched(5, device)
    labels = [(m >= 1).float() - (m < 0).float() for m in matched]  # RPN labels: 1, 0 or -1
    objectness = torch.randn(sum(len(m) for m in matched), 1, device=device)
    deltas = torch.randn(len(objectness), 4, device=device)
    targets = [torch.randn(len(m), 4, device=device) for m in matched]
    kwargs = dict(anchor_generator=None, head=None, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=64,
                  positive_fraction=0.5, pre_nms_top_n={"training": 10, "testing": 10}, post_nms_top_n={"training": 10, "testing": 10},
                  nms_thresh=0.7)
    losses = []
    for rpn in (RegionProposalNetwork(**kwargs), OneWaitRPN(**kwargs)):
        torch.manual_seed(3)
        losses.append(rpn.compute_loss(objectness, deltas, labels, targets))
    assert all(torch.equal(e, a) for e, a in zip(*losses))
    assert losses[0][1] > 0  # the box loss had positives

    heads = [RoIHeads(None, None, None, 0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 100), None]
    heads[1] = copy.copy(heads[0])
    heads[1].fg_bg_sampler = OneWaitSampler(64, 0.25)

    subsampled = []
    for subsample in (heads[0].subsample, lambda labels: OneWaitRoIHeads.subsample(heads[1], labels)):
        torch.manual_seed(4)
        subsampled.append(subsample([m.clamp(min=0) for m in matched]))
    assert all(torch.equal(e, a) for e, a in zip(*subsampled))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_wait_rpn_filters_proposals_as_torchvision(training, device):
    """Clipping, small boxes, scores, per-level top-k and NMS: torchvision's proposals, exactly."""
    generator = torch.Generator().manual_seed(11)
    per_level = [300, 120, 40]
    corners = torch.rand(2, sum(per_level), 2, generator=generator) * 120 - 10
    sizes = torch.rand(2, sum(per_level), 2, generator=generator) * 60
    sizes[:, ::17] = 1e-4  # degenerate boxes, dropped by the small-box rule
    proposals = torch.cat([corners, corners + sizes], dim=2).to(device)
    objectness = torch.randn(2 * sum(per_level), 1, generator=generator).to(device)
    kwargs = dict(anchor_generator=None, head=None, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=64,
                  positive_fraction=0.5, pre_nms_top_n={"training": 100, "testing": 60},
                  post_nms_top_n={"training": 50, "testing": 30}, nms_thresh=0.7, score_thresh=0.75)
    results = []
    for rpn in (RegionProposalNetwork(**kwargs), OneWaitRPN(**kwargs)):
        rpn.train(training)
        results.append(rpn.filter_proposals(proposals, objectness, [(100, 110), (90, 120)], per_level))
    (boxes, scores), (one_wait_boxes, one_wait_scores) = results
    assert all(torch.equal(a, e) for a, e in zip(one_wait_boxes, boxes))
    assert all(torch.equal(a, e) for a, e in zip(one_wait_scores, scores))
    assert 0 < len(boxes[0]) <= (50 if training else 30)


@pytest.mark.parametrize("device", DEVICES)
def test_detector_gives_torchvision_faster_rcnn_losses_and_detections(device):
    """End to end: the same weights in torchvision's own Faster R-CNN give the same training
    losses (same seed) and the same detections."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128],
                      rpn_batch_size_per_image=64, box_batch_size_per_image=64)
    ours = build_detector(cfg, num_classes=3)
    reference = FasterRCNN(
        copy.deepcopy(ours.backbone), rpn_anchor_generator=copy.deepcopy(ours.rpn.anchor_generator),
        rpn_head=copy.deepcopy(ours.rpn.head), box_head=copy.deepcopy(ours.roi_heads.box_head),
        box_predictor=copy.deepcopy(ours.roi_heads.box_predictor),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_positive_fraction=cfg.box_positive_fraction,
        box_score_thresh=0.0, box_nms_thresh=cfg.box_nms_thresh, box_detections_per_img=cfg.box_detections_per_img,
    )
    ours.roi_heads.score_thresh = 0.0  # random weights: keep every detection, so there are some to compare
    reference.transform = ours.transform  # compared with torchvision's in test_detector.py
    reference.load_state_dict(ours.state_dict())
    ours.to(device), reference.to(device)
    images = [torch.rand(3, 96, 128, device=device), torch.rand(3, 112, 96, device=device)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [50, 5, 120, 40]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[4.0, 40, 30, 100]]), "labels": torch.tensor([2])}]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    losses = []
    for model in (reference.train(), ours.train()):
        torch.manual_seed(9)
        losses.append(model(images, targets))
    assert losses[0].keys() == losses[1].keys()
    tolerance = 1e-6 if device == "cpu" else 1e-4  # CUDA: atomics and kernel choices round differently
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=tolerance, atol=tolerance / 10, msg=name)
    with torch.no_grad():
        expected, actual = reference.eval()(images), ours.eval()(images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    for e, a in zip(expected, actual):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], e[key], rtol=tolerance, atol=1e-5 if device == "cpu" else 1e-3, msg=key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-maps-autocast"])
def test_level_sorted_roi_align_equals_torchvision(dtype, device):
    """One host-device wait per call instead of one per level (a speed-up): the same values
    and gradients as torchvision's MultiScaleRoIAlign, an image without boxes included."""
    from torchvision.ops import MultiScaleRoIAlign

    from ssod.models.rcnn import LevelSortedRoIAlign

    torch.manual_seed(0)
    features = {name: torch.randn(2, 4, size, size) for name, size in zip("0123", (176, 88, 44, 22))}
    if dtype != torch.float32:  # low-precision maps, one level in float32: each level's result is cast
        features = {name: f.to(dtype if name != "2" else torch.float32) for name, f in features.items()}
    features = {name: f.to(device).requires_grad_() for name, f in features.items()}
    boxes = []
    for count in (40, 0):  # 1 to 600 px: every pyramid level gets boxes
        corner = torch.rand(count, 2) * 100
        boxes.append(torch.cat([corner, corner + 1 + torch.rand(count, 1) * 600], dim=1).to(device))
    sizes = [(704, 704), (704, 640)]
    results = []
    for pooler in (MultiScaleRoIAlign(list("0123"), 7, 2), LevelSortedRoIAlign(list("0123"), 7, 2)):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):  # as in training
            pooled = pooler(features, boxes, sizes)
        cotangent = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(pooled)
        results.append((pooled, torch.autograd.grad(pooled, list(features.values()), cotangent)))
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.dtype == expected.dtype and actual.shape == (40, 4, 7, 7)
    assert torch.equal(actual, expected)
    # CUDA's RoIAlign backward adds with atomics, in no fixed order: equal up to rounding there.
    tolerance = {} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    for a, e in zip(actual_grads, expected_grads):
        assert torch.equal(a, e) if device == "cpu" else torch.allclose(a.float(), e.float(), **tolerance)
    assert all(g.abs().sum() > 0 for g in expected_grads)  # the boxes reach every level


