"""The speed settings give the same outputs as before, within float tolerance.

Each test runs on the CPU and, where one is present, on a CUDA GPU (CI has none; the
GPU runs are made on a lent machine with ``experiments/gpu_check.sh``). Mixed precision
is compared with float32 on the same weights and inputs; ``channels_last`` and TF32
with the default format and precision; the fused EMA update with the per-tensor one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssod.build import apply_speed_settings, build_model
from ssod.methods import build_method
from ssod.config import compose
from ssod.data.pipeline import build_data
from ssod.data.sampling import infinite_loader
from ssod.losses import box_outputs, weighted_total
from ssod.step import to_device
from ssod.training import run
from tests.conftest import tiny_overrides

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AMP_DTYPES = [torch.bfloat16, torch.float16]
# Images upscaled past 1024 px: bf16 numbers there are 8 apart, so a box that went
# through bf16 is off by up to 4 px, far outside the tolerances below.
LARGE = ("data.train_min_sizes=[1056,1056]", "data.train_max_size=1400")


@pytest.fixture(autouse=True)
def _restore_tf32():
    """apply_speed_settings sets process-wide flags: give the next test PyTorch's own."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _setup(tmp_path: Path, dataset_cache: Path, device: str, *overrides: str, method: str = "polish_teacher"):
    cfg = compose([*tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", method), *overrides])
    method_cfg = OmegaConf.to_object(cfg.method)
    data = build_data(cfg.data, tmp_path, need_unlabeled=True)
    torch.manual_seed(0)
    student = build_model(cfg.model, method_cfg, data.category_map.num_classes).to(device)
    labeled = to_device(next(infinite_loader(data.labeled, 2, 0, 0, 1, 0, 0))[0], torch.device(device))
    unlabeled = to_device(next(infinite_loader(data.unlabeled, 2, 1, 0, 1, 0, 0))[0], torch.device(device))
    return cfg, method_cfg, student, labeled, unlabeled


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_boxes_stay_float32_under_mixed_precision(device, dtype, tmp_path, dataset_cache):
    """Anchors, proposals and decoded detections are float32 and within 1 px of float32's.

    Without the float32 heads, torchvision decodes in the autocast dtype: proposals and
    detections come out as bf16/fp16 numbers, several pixels off on large images.
    """
    _, _, model, _, unlabeled = _setup(tmp_path, dataset_cache, device, *LARGE)
    detector = model.detector.eval()
    images, _ = detector.transform([weak.image for weak, _, _ in unlabeled])
    assert max(images.tensors.shape[-2:]) > 1024
    with torch.no_grad():
        features = detector.backbone(images.tensors)
        anchors = detector.rpn.anchor_generator(images, list(features.values()))
        proposals, _ = detector.rpn(images, features)
        logits, deltas = box_outputs(detector, features, proposals, images.image_sizes)
        with torch.autocast(device, dtype=dtype):
            low_features = detector.backbone(images.tensors)
            low_anchors = detector.rpn.anchor_generator(images, list(low_features.values()))
            low_proposals, _ = detector.rpn(images, low_features)
            # The RoI head on the same (float32) proposals, to compare box for box.
            low_logits, low_deltas = box_outputs(detector, low_features, proposals, images.image_sizes)
            detections = detector(images.tensors.unbind(0))
    assert low_features["0"].dtype == dtype  # the convolutions did run in low precision
    assert all(torch.equal(a, b) for a, b in zip(low_anchors, anchors))
    assert all(p.dtype == torch.float32 for p in low_proposals)
    assert all(d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32 for d in detections)
    assert low_logits.dtype == low_deltas.dtype == torch.float32
    coder, stacked = detector.roi_heads.box_coder, torch.cat(proposals)
    boxes, low_boxes = coder.decode(deltas, [stacked]), coder.decode(low_deltas, [stacked])
    assert low_boxes.dtype == torch.float32
    assert (low_boxes - boxes).abs().max().item() < 1.0
    assert torch.testing.assert_close(low_logits.softmax(1), logits.softmax(1), rtol=0, atol=0.05) is None


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_polishing_networks_under_mixed_precision_match_float32(device, dtype, tmp_path, dataset_cache):
    """Polished boxes within 1 px, category probabilities and training losses within 2%."""
    _, _, model, labeled, _ = _setup(tmp_path, dataset_cache, device, *LARGE)
    detector, polisher = model.detector.eval(), model.polisher
    images, _ = detector.transform([item[0] for item in labeled])
    gt_boxes = [item[1]["boxes"] for item in labeled]
    gt_labels = [item[1]["labels"] for item in labeled]
    scores = [torch.full((len(b),), 0.8, device=device) for b in gt_boxes]

    def polish_and_losses():
        with torch.no_grad():
            features = detector.backbone(images.tensors)
            proposals, _ = detector.rpn(images, features)
        polished = polisher.polish(features, gt_boxes, gt_labels, scores, images.image_sizes)
        generator = torch.Generator(device=device).manual_seed(0)
        losses, _ = polisher.losses(features, gt_boxes, gt_labels, proposals, images.image_sizes, generator)
        return polished, losses

    polished, losses = polish_and_losses()
    with torch.autocast(device, dtype=dtype):
        low_polished, low_losses = polish_and_losses()
    for high, low in zip(polished, low_polished):
        assert low.reg_boxes.dtype == torch.float32
        assert (low.reg_boxes - high.reg_boxes).abs().max().item() < 1.0
        assert torch.equal(low.cls_keep, high.cls_keep) or (low.cls_keep != high.cls_keep).float().mean() < 0.1
    for name, value in losses.items():
        assert low_losses[name].dtype == torch.float32 and torch.isfinite(low_losses[name])
        assert abs(low_losses[name].item() - value.item()) <= 0.02 * abs(value.item()) + 1e-3, name
    sum(low_losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in polisher.parameters() if p.grad is not None)


def _step_losses_and_grads(student, teacher, labeled, unlabeled, method) -> tuple[dict, list]:
    torch.manual_seed(1)  # torchvision's samplers draw from the global RNG
    student.zero_grad(set_to_none=True)
    method = build_method(method)
    result = method.compute_losses(student, teacher, labeled, unlabeled)
    weighted_total(result.losses, method.loss_weights()).backward()
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    return {k: v.detach() for k, v in result.losses.items()}, grads


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gives_the_same_losses_and_gradients(device, tmp_path, dataset_cache):
    cfg, method, student, labeled, unlabeled = _setup(tmp_path, dataset_cache, device)
    apply_speed_settings(OmegaConf.merge(cfg.train, {"tf32": False}), student)  # compare formats only
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.train()
    losses, _ = _step_losses_and_grads(student, teacher, labeled, unlabeled, method)

    fast_cfg = OmegaConf.merge(cfg.train, {"channels_last": True, "tf32": False})
    fast_student = apply_speed_settings(fast_cfg, copy.deepcopy(student))
    fast_teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    assert fast_student.detector.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast_losses, _ = _step_losses_and_grads(fast_student, fast_teacher, labeled, unlabeled, method)
    assert losses.keys() == fast_losses.keys()
    for name in losses:
        torch.testing.assert_close(fast_losses[name], losses[name], rtol=1e-3, atol=1e-5, msg=name)

    # Gradients of the layers whose format changes (backbone + FPN, RPN head, the polishing
    # merge), against fixed cotangents, in float64. The whole step's gradients are no measure: on a GPU the
    # formats' last-bit differences reorder near-equal RPN scores of a random-weight model,
    # so other proposals are sampled (an H100 gave losses equal to 1e-3, gradients 0.9%
    # apart); and in float32 this random network amplifies rounding on its way back to the
    # stem (0.3% there on a CPU, 1e-5 from layer2 on), where float64 leaves ~1e-12.
    grads, fast_grads = (_convolution_gradients(copy.deepcopy(model).double(), labeled) for model in (student, fast_student))
    assert grads.keys() == fast_grads.keys()
    assert any(name.startswith("detector.rpn.head") for name in grads) and "polisher.box_net.merge.weight" in grads
    for name, expected in grads.items():
        assert _relative_error(fast_grads[name], expected) < 1e-9, name


def _convolution_gradients(model, labeled) -> dict[str, torch.Tensor]:
    """Gradients of every layer whose weights channels_last reformats (backbone + FPN, RPN
    head, the box polishing network's merge), each driven by a fixed random cotangent."""
    detector = model.detector
    model.zero_grad(set_to_none=True)
    images, _ = detector.transform([item[0].double() for item in labeled])
    maps = list(detector.backbone(images.tensors).values())
    logits, deltas = detector.rpn.head(maps)
    channels = maps[0].shape[1]
    votes = torch.randn(5, model.polisher.box_net.num_votes, channels, 7, 7, generator=torch.Generator().manual_seed(4))
    outputs = maps + logits + deltas + [model.polisher.box_net(votes.to(maps[0]))]
    generator = torch.Generator().manual_seed(3)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device) for out in outputs]
    torch.autograd.backward(outputs, cotangents)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA GPUs")
def test_tf32_losses_are_close_to_strict_float32(tmp_path, dataset_cache):
    cfg, method, student, labeled, unlabeled = _setup(tmp_path, dataset_cache, "cuda")
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.train()
    results = {}
    for tf32 in (False, True):
        apply_speed_settings(OmegaConf.merge(cfg.train, {"tf32": tf32}), student)
        results[tf32] = _step_losses_and_grads(student, teacher, labeled, unlabeled, method)
    apply_speed_settings(OmegaConf.merge(cfg.train, {"tf32": False}), student)
    for name, strict in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], strict, rtol=1e-2, atol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ema_update_equals_one_lerp_per_tensor(device):
    from ssod.models.teacher import ema_update

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 5)).to(device)
    teacher = copy.deepcopy(student)
    for param in student.parameters():
        param.data.add_(torch.randn_like(param))
    expected = [t.detach().clone().lerp_(s.detach(), 1 - 0.99) for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.99)
    for actual, wanted in zip(teacher.parameters(), expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-7)


MIXED = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])  # accelerate's fp16 needs a GPU


@pytest.mark.slow
@pytest.mark.parametrize("precision", MIXED)
def test_polish_teacher_trains_in_mixed_precision(precision, tmp_path, dataset_cache):
    """A few Polishing Teacher steps through ``train.run`` (fp16: with the loss scaler)."""
    overrides = [*tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "polish_teacher"),
                 f"train.mixed_precision={precision}", "train.iterations=3", "tracking.enabled=false",
                 "data.val_max_images=2", f"train.channels_last={torch.cuda.is_available()}"]
    result = run(compose(overrides))
    assert result.status == "FINISHED"
    assert result["train/nonfinite_steps"] == 0
    losses = {name: value for name, value in result.items() if name.startswith("train/loss")}
    assert losses and all(torch.isfinite(torch.tensor(value)) for value in losses.values()), losses
    assert "val/teacher/bbox_AP" in result and "val/student/bbox_AP" in result
    checkpoint = torch.load(tmp_path / "outputs" / "checkpoints" / "step-00000003.pt", weights_only=True)
    assert checkpoint["step"] == 3


def test_a_persistent_evaluation_loader_predicts_the_same_every_time(tmp_path, dataset_cache):
    """Workers that persist between evaluations change no prediction and draw nothing from the training RNG."""
    from ssod.inference import eval_loader, predict

    cfg = compose(tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "supervised"))
    data = build_data(cfg.data, tmp_path, need_unlabeled=False)
    torch.manual_seed(0)
    detector = build_model(cfg.model, OmegaConf.to_object(cfg.method), data.category_map.num_classes).detector
    indices = list(range(len(data.val)))
    reference = predict(detector, eval_loader(data.val, indices, batch_size=3), "cpu")
    loader = eval_loader(data.val, indices, batch_size=3, num_workers=2)
    rng = torch.get_rng_state()
    runs = [predict(detector, loader, "cpu") for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(reference) == len(indices) and any(len(r["boxes"]) for r in reference)
    for predictions in runs:
        assert [p["image_id"] for p in predictions] == [p["image_id"] for p in reference]
        for got, want in zip(predictions, reference):
            assert all(torch.equal(got[key], want[key]) for key in ("boxes", "scores", "labels"))


def test_meters_measure_pseudo_label_quality_at_the_interval_as_per_step_would():
    """Quality is kept per step and measured in ``compute``: same numbers as measuring at once."""
    from types import SimpleNamespace

    from ssod.data.transforms import View
    from ssod.evaluation import PseudoLabelQuality
    from ssod.meters import Meters, hidden_ground_truth
    from ssod.models.teacher import PseudoLabels

    method = OmegaConf.to_object(compose(["method=soft_teacher"]).method)
    meters = Meters(method.cls_pseudo_threshold, ("a", "b"))
    direct = PseudoLabelQuality()
    shift = torch.tensor([[1.0, 0, 4], [0, 1.0, -2], [0, 0, 1]], dtype=torch.float64)  # original -> weak view
    for step in range(3):
        hidden = {"boxes": torch.tensor([[10.0, 10, 40, 40], [50, 20, 90, 60]]), "labels": torch.tensor([1, 2])}
        boxes = torch.tensor([[14.0, 8, 44, 38], [55.0 + step, 18, 94, 58], [0, 0, 5, 5]])
        pseudo = PseudoLabels.unpolished(boxes, torch.tensor([1, 1, 2]), torch.tensor([0.95, 0.99, 0.5]))
        weak = View(torch.zeros(3, 64, 100), shift)
        result = SimpleNamespace(losses={"sup/roi_cls": torch.tensor(1.0)}, stats={}, teacher=SimpleNamespace(pseudo_labels=[pseudo]))
        meters.update(result, torch.tensor(2.0), [(weak, None, hidden)], skipped=False)
        gt_boxes, gt_labels = hidden_ground_truth({"size": (64, 100), "matrix": shift, "hidden": hidden})
        direct.update(pseudo, gt_boxes, gt_labels, method.cls_pseudo_threshold)
    assert len(meters.pending) == 3 and len(meters.recent) == 3
    scalars = meters.compute()
    expected = direct.compute()
    assert expected["pseudo/images"] == 3 and expected["pseudo/recall/raw"] > 0
    for name, value in expected.items():
        assert scalars[name] == pytest.approx(value, nan_ok=True), name
    assert meters.pending == [] and len(meters.recent) == 3 and "image" in meters.recent[-1]
