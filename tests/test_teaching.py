"""ssod.teaching: pseudo labels carried from the teacher's weak view into the student's strong view."""

import math

import pytest
import torch

from ssod.config import MethodConfig
from ssod.data.transforms import project_boxes, relative_matrix
from ssod.teaching import project_pseudo_labels
from ssod.models.teacher import PseudoLabels


def _matrix(scale: float, angle_degrees: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    cos, sin = math.cos(math.radians(angle_degrees)), math.sin(math.radians(angle_degrees))
    return torch.tensor([[scale * cos, -scale * sin, shift[0]], [scale * sin, scale * cos, shift[1]], [0, 0, 1]], dtype=torch.float64)


def _pseudo() -> PseudoLabels:
    boxes = torch.tensor([[5.0, 5, 30, 30], [40, 10, 70, 50], [90, 90, 99, 99], [10, 60, 12, 61], [20, 20, 50, 45]])
    return PseudoLabels(
        boxes, torch.tensor([1, 2, 3, 1, 2]), torch.tensor([0.95, 0.6, 0.8, 0.99, 0.3]), boxes + 2.0,
        reg_keep=torch.tensor([True, True, True, False, True]),
        cls_keep=torch.tensor([True, True, True, True, False]),
        cls_labels=torch.tensor([1, 3, 3, 1, 2]),
    )


@pytest.mark.parametrize("thresholds", [(0.5, 0.5), (0.7, 0.9)], ids=["same", "different"])
def test_projected_targets_equal_each_target_projected_alone(thresholds):
    """The batched projection (one mapping per box set, one index per target) gives what
    projecting each target of ``PseudoLabels`` through ``project_boxes`` gives."""
    rpn_thr, cls_thr = thresholds
    method = MethodConfig(rpn_pseudo_threshold=rpn_thr, cls_pseudo_threshold=cls_thr)
    pseudo = [_pseudo(), _pseudo()]
    weak = torch.stack([_matrix(0.8), _matrix(1.2, shift=(3, 4))])
    # The second strong view rotates and shifts boxes partly out of its 80 x 90 canvas.
    strong = torch.stack([_matrix(1.0, 10.0), _matrix(1.1, -25.0, (-45, 10))])
    sizes = [(90, 80), (90, 80)]
    targets = project_pseudo_labels(pseudo, relative_matrix(weak, strong), sizes, method.rpn_pseudo_threshold, method.cls_pseudo_threshold)

    for index, labels in enumerate(pseudo):
        matrix = relative_matrix(weak[index], strong[index])
        expected = {
            "rpn": labels.classification_target(rpn_thr),
            "cls": labels.classification_target(cls_thr),
            "reg": labels.regression_target(),
        }
        for name, target in expected.items():
            boxes, keep = project_boxes(target["boxes"], matrix, 80, 90)
            actual = targets[name][index]
            assert actual["boxes"].dtype == torch.float32
            torch.testing.assert_close(actual["boxes"], boxes, msg=name)
            assert torch.equal(actual["labels"], target["labels"][keep]), name
    # The rules drop boxes in the first view (thresholds, keep masks), the canvas more in the second.
    counts = {name: [len(t["boxes"]) for t in per_image] for name, per_image in targets.items()}
    assert all(0 < per_image[0] < 5 for per_image in counts.values()), counts
    assert sum(per_image[1] for per_image in counts.values()) < sum(per_image[0] for per_image in counts.values()), counts


@pytest.mark.parametrize("cap", [20, 1000], ids=["capped", "uncapped"])
def test_teacher_threshold_before_nms_keeps_the_same_detections(cap):
    """Dropping low scores before the NMS (a speed-up) changes no detection above the threshold,
    whether the per-image cap or the threshold decides which detections are left."""
    from ssod.config import ModelConfig
    from ssod.teaching import score_threshold
    from ssod.models.detector import build_detector
    from ssod.models.teacher import filter_detections

    torch.manual_seed(0)
    model = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128],
                        rpn_post_nms_top_n_test=300, box_detections_per_img=cap)
    detector = build_detector(model, num_classes=3).eval()
    with torch.no_grad():
        # Hundreds of overlapping candidates with scores on both sides of 0.5.
        detector.roi_heads.box_predictor.cls_score.weight.mul_(5.0)
        images, _ = detector.transform([torch.rand(3, 96, 96), torch.rand(3, 80, 112)])
        features = detector.backbone(images.tensors)
        proposals, _ = detector.rpn(images, features)
        full, _ = detector.roi_heads(features, proposals, images.image_sizes)
        with score_threshold(detector.roi_heads, 0.5):
            early, _ = detector.roi_heads(features, proposals, images.image_sizes)
    assert detector.roi_heads.score_thresh == model.box_score_thresh  # restored
    expected, actual = filter_detections(full, 0.5), filter_detections(early, 0.5)
    kept = [len(boxes) for boxes, _, _ in expected]
    if cap == 20:
        assert kept == [20, 20]  # the cap decided
    else:
        assert all(0 < n < len(d["scores"]) for n, d in zip(kept, full))  # the threshold decided
    for (boxes, labels, scores), (e_boxes, e_labels, e_scores) in zip(actual, expected):
        assert torch.equal(boxes, e_boxes) and torch.equal(labels, e_labels) and torch.equal(scores, e_scores)


def test_detections_come_to_the_host_unchanged_in_one_copy():
    from ssod.inference import detections_to_host

    outputs = [
        {"boxes": torch.rand(3, 4) * 500, "scores": torch.rand(3), "labels": torch.tensor([1, 80, 7])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.rand(1, 4), "scores": torch.rand(1), "labels": torch.tensor([2])},
    ]
    for (boxes, scores, labels), out in zip(detections_to_host(outputs), outputs):
        assert torch.equal(boxes, out["boxes"]) and torch.equal(scores, out["scores"]) and torch.equal(labels, out["labels"])
        assert labels.dtype == torch.int64 and scores.untyped_storage().nbytes() == scores.numel() * 4


@pytest.mark.parametrize("use", ["both", "boxes", "categories", "none"])
def test_polish_use_takes_the_polished_boxes_and_categories_it_names(use):
    """The ablations: each part of polishing is used only where ``method.polish_use`` says."""
    from ssod.methods.polish_teacher import PolishTeacher

    raw = torch.tensor([[5.0, 5, 30, 30], [40, 10, 70, 50], [10, 10, 60, 60]])
    polished_boxes = raw + torch.tensor([1.0, -1, 2, 0])
    polished = PseudoLabels(raw, torch.tensor([1, 2, 3]), torch.tensor([0.95, 0.6, 0.92]), polished_boxes,
                            reg_keep=torch.ones(3, dtype=torch.bool), cls_keep=torch.tensor([True, True, False]),
                            cls_labels=torch.tensor([1, 4, 3]))
    labels = PolishTeacher(MethodConfig(name="polish_teacher", polish_use=use, det_score_thr=0.9)).use_polished(polished)
    assert torch.equal(labels.boxes, raw) and torch.equal(labels.labels, polished.labels)
    expected_boxes = polished_boxes if use in ("both", "boxes") else raw
    assert torch.equal(labels.reg_boxes, expected_boxes) and labels.reg_keep.all()
    if use in ("both", "categories"):  # the category network's keep and relabel
        assert labels.cls_keep.tolist() == [True, True, False] and labels.cls_labels.tolist() == [1, 4, 3]
    else:  # the detector's own: a score above det_score_thr, its label
        assert labels.cls_keep.tolist() == [True, False, True] and labels.cls_labels.tolist() == [1, 2, 3]
