"""``train_step``: what one iteration applies, and what it leaves alone when it must not step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from ssod.build import build_optimizer, build_scheduler
from ssod.config import compose
from ssod.data.transforms import View
from ssod.methods import build_method
from ssod.data.pipeline import build_data
from ssod.data.sampling import infinite_loader
from ssod.run_state import RunState
from ssod.step import StepFlags, Training, train_step
from ssod.step import forget_accelerator, to_device
from tests.conftest import tiny_overrides


@pytest.fixture
def parts(tmp_path, dataset_cache, accelerator):
    """A prepared polish_teacher Training on the CPU, one fixed batch, and what a step needs."""
    return _parts(tmp_path, dataset_cache, accelerator)


def _parts(tmp_path, dataset_cache, accelerator, model="resnet18_fpn"):
    cfg = compose(tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "polish_teacher", model))
    method = build_method(OmegaConf.to_object(cfg.method))
    data = build_data(cfg.data, tmp_path, need_unlabeled=True)
    torch.manual_seed(0)
    student = method.build_model(cfg.model, data.category_map.num_classes).to(accelerator.device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    optimizer = build_optimizer(cfg.train, student)
    scheduler = build_scheduler(cfg.train, optimizer)
    student, optimizer = accelerator.prepare(student, optimizer)
    training = Training(accelerator, student, teacher, optimizer, scheduler, RunState(), tmp_path / "checkpoints", 1)
    labeled = to_device(next(infinite_loader(data.labeled, 1, 0, 0, 1, 0, 0))[0], accelerator.device)
    unlabeled = to_device(next(infinite_loader(data.unlabeled, 1, 1, 0, 1, 0, 0))[0], accelerator.device)
    return training, (labeled, unlabeled, method, method.loss_weights(), cfg.train)


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [param.detach().clone() for param in module.parameters()]


def _unchanged(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(old, param) for old, param in zip(before, module.parameters()))


def test_a_step_moves_student_schedule_and_both_parts_of_the_teacher(parts):
    training, batch = parts
    student = _snapshot(training.student)
    detector, polisher = _snapshot(training.teacher.detector), _snapshot(training.teacher.polisher)
    _, total, flags = train_step(training, *batch, lambda: False)
    assert flags == StepFlags(nonfinite=False, stop=False, bad_files=0) and torch.isfinite(total)
    assert not _unchanged(training.student, student)
    assert not _unchanged(training.teacher.detector, detector) and not _unchanged(training.teacher.polisher, polisher)
    assert training.scheduler.last_epoch == 1 and training.state.ema_steps == 1


def test_a_step_the_fp16_scaler_skipped_moves_neither_schedule_nor_teacher(parts, monkeypatch):
    """fp16 on a GPU: accelerate's scaler skips a step whose gradients overflowed. The
    learning-rate schedule and the EMA teacher must then stay where they are."""
    from accelerate import Accelerator

    training, batch = parts
    train_step(training, *batch, lambda: False)
    teacher = _snapshot(training.teacher)
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    train_step(training, *batch, lambda: False)
    assert training.scheduler.last_epoch == 1 and training.state.ema_steps == 1
    assert _unchanged(training.teacher, teacher)


def test_after_the_first_lr_step_the_freeze_stops_the_detectors_teacher_only(parts):
    """The reference freezes its Mean Teacher hook (the detector) and not the polishing
    networks' (MeanRFNet), which follows its student to the end."""
    training, (labeled, unlabeled, method, weights, train) = parts
    method.ema = dataclasses.replace(method.ema, freeze_after_first_lr_step=True)
    training.state.step = train.lr_steps[0]  # this step is past the first learning-rate step
    detector, polisher = _snapshot(training.teacher.detector), _snapshot(training.teacher.polisher)
    train_step(training, labeled, unlabeled, method, weights, train, lambda: False)
    assert _unchanged(training.teacher.detector, detector)
    assert not _unchanged(training.teacher.polisher, polisher)
    assert training.state.ema_steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's fp16 loss scaler runs on CUDA GPUs only")
def test_a_step_whose_fp16_gradients_overflow_is_skipped_by_the_scaler(tmp_path, dataset_cache):
    """The real path on a GPU: at a loss scale of 2**100 the fp16 gradients overflow, and
    the scaler skips the step; student, schedule and teacher stay, the scale halves."""
    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs

    accelerator = Accelerator(mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=2.0**100)])
    try:
        training, batch = _parts(tmp_path, dataset_cache, accelerator)
        student, teacher = _snapshot(training.student), _snapshot(training.teacher)
        _, total, flags = train_step(training, *batch, lambda: False)
        assert torch.isfinite(total) and not flags.nonfinite  # the loss is fine; its scaled gradients are not
        assert accelerator.optimizer_step_was_skipped
        assert _unchanged(training.student, student) and _unchanged(training.teacher, teacher)
        assert training.scheduler.last_epoch == 0 and training.state.ema_steps == 0
        assert accelerator.scaler.get_scale() == 2.0**99
    finally:
        forget_accelerator(accelerator)


def test_the_loop_stops_on_the_agreed_flags_before_anything_is_applied(parts):
    """The loop's order: forward, the flags all processes agree on, the bad-image limit (it may
    stop the run), then the step. Stopped there, nothing has moved."""
    from types import SimpleNamespace

    from ssod.data.coco import DatasetError
    from ssod.run_state import stop_if_too_many_bad
    from ssod.step import agree_on_flags, forward
    from ssod.tracking import Tracker

    training, (labeled, unlabeled, method, weights, train) = parts
    student = _snapshot(training.student)
    training.state.bad_files.append("broken.jpg")
    _, total = forward(training, labeled, unlabeled, method, weights)
    flags = agree_on_flags(training, total, stop_requested=False)
    assert flags.bad_files == 1 and not flags.stop
    data = SimpleNamespace(labeled=[None] * 10, unlabeled=None)
    with pytest.raises(DatasetError, match="1 of 10 training images could not be read"):
        stop_if_too_many_bad(training.state, data, 0.05, Tracker("", "unused", enabled=False), flags.bad_files)
    assert _unchanged(training.student, student)
    assert training.scheduler.last_epoch == 0 and training.state.ema_steps == 0


def test_a_stop_request_is_asked_after_the_forward_pass_and_the_step_still_applies(parts, monkeypatch):
    """A Ctrl-C that arrives during the forward pass stops the run after this very step."""
    import ssod.methods.base

    training, batch = parts
    real, events = ssod.methods.base.Method.compute_losses, []
    monkeypatch.setattr(ssod.methods.base.Method, "compute_losses", lambda *args: events.append("losses") or real(*args))
    _, _, flags = train_step(training, *batch, lambda: events.append("asked") or True)
    assert flags.stop and events == ["losses", "asked"]
    assert training.scheduler.last_epoch == 1  # the step is taken; the loop then checkpoints and stops


def test_a_non_finite_loss_skips_the_step_and_gives_up_after_a_checkpoint(parts, monkeypatch):
    import ssod.methods.base
    from ssod.checkpoint import list_checkpoints
    from ssod.step import NonFiniteLossError

    training, batch = parts
    real = ssod.methods.base.Method.compute_losses

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        result.losses = {name: loss * float("nan") for name, loss in result.losses.items()}
        return result

    monkeypatch.setattr(ssod.methods.base.Method, "compute_losses", poisoned)
    student = _snapshot(training.student)
    max_in_a_row = batch[-1].max_consecutive_nonfinite
    for _ in range(max_in_a_row - 1):
        assert train_step(training, *batch, lambda: False)[2].nonfinite
    assert _unchanged(training.student, student) and training.scheduler.last_epoch == 0
    assert all(param.grad is None for param in training.student.parameters())
    assert list_checkpoints(training.ckpt_dir) == []
    with pytest.raises(NonFiniteLossError, match=f"{max_in_a_row} consecutive steps"):
        train_step(training, *batch, lambda: False)
    assert training.state.nonfinite_steps == max_in_a_row
    assert [step for step, _ in list_checkpoints(training.ckpt_dir)] == [0]


def test_with_unsup_weight_0_a_semi_supervised_step_moves_the_student_as_the_supervised_step(tmp_path, dataset_cache,
                                                                                                accelerator):
    """The contract behind every comparison with the supervised baseline: the unsupervised
    branch adds nothing but its weighted losses. Same labeled batch, same RNG, same weights:
    with ``unsup_weight=0`` the semi-supervised step's student equals the supervised step's.

    Exact up to float rounding when both steps see the labeled images on the same canvas. The
    strong views are cut to the labeled image's size here because a larger view enlarges the
    padded batch: the RPN then ranks and samples anchors of the padding too, and the
    supervised losses change (measured: RoI classification 3.91 against 3.65 on this batch).
    Likewise GroupNorm (the from-scratch ResNet-18) takes the padding into its statistics,
    so this runs on the main job's model, whose BatchNorm is frozen."""
    runs = {}
    for name in ("semi", "supervised"):
        training, (labeled, unlabeled, method, _, train) = _parts(tmp_path / name, dataset_cache, accelerator,
                                                                  "efficientnet_lite0_fpn")
        method.schedule = dataclasses.replace(method.schedule, unsup_weight=0.0)
        height, width = labeled[0][0].shape[-2:]
        unlabeled = [(weak, View(strong.image[:, :height, :width], strong.matrix), hidden)
                     for weak, strong, hidden in unlabeled]
        # Clipping off: its norm includes the polishing networks, whose samples come after the
        # unsupervised ones in the random stream (so do differ); they never reach the detector.
        train = OmegaConf.merge(train, {"grad_clip_norm": None})
        for group in training.optimizer.param_groups:
            group["lr"] = 1.0  # an update far above the weights' float32 resolution
        initial = _snapshot(accelerator.unwrap_model(training.student).detector)
        torch.manual_seed(7)
        result, _, _ = train_step(training, labeled, unlabeled if name == "semi" else [], method,
                                  method.loss_weights(), train, lambda: False)
        assert ("unsup/roi_cls" in result.losses) == (name == "semi")  # the branch did run
        runs[name] = _snapshot(accelerator.unwrap_model(training.student).detector)
    assert not all(torch.equal(a, b) for a, b in zip(initial, runs["supervised"]))  # the step moved it
    for before, semi, supervised in zip(initial, runs["semi"], runs["supervised"]):
        # The updates themselves agree (not merely the weights, which barely moved at warm-up).
        torch.testing.assert_close(semi - before, supervised - before, rtol=1e-3, atol=1e-6)
