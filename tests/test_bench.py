"""``ssod-bench`` end to end on a tiny config: the table, the ratios, the profile and MLflow."""

from __future__ import annotations

import time

import pytest
import torch

from ssod.bench import interleaved_medians, main
from tests.conftest import tiny_overrides



@pytest.mark.slow
def test_bench_prints_every_part_and_logs_the_ratios(tmp_path, dataset_cache, mlflow_uri, mlflow_store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides(tmp_path, dataset_cache, mlflow_uri, "polish_teacher") if not o.startswith("method=")]
    assert main(["--repeats", "1", "--warmup", "1", "--eval-images", "4", "--profile", "1", "--overrides", *overrides]) == 0
    out = capsys.readouterr().out
    for part in ("supervised step (labeled)", "supervised step (labeled + unlabeled)", "teacher inference",
                 "polishing (train + polish)", "soft_teacher step", "polish_teacher step", "data loading per batch",
                 "mlflow logging per interval", "evaluation", "evaluation loader alone", "model inference",
                 "polish / (supervised all + teacher inference)", "polish / soft_teacher", "profile of 1 polish_teacher steps"):
        assert part in out, part
    assert "WARNING" not in out
    assert "random weights; pseudo labels per unlabeled image:" in out
    # The profile's named parts of the step, with their host time.
    for part in ("ssod::teacher_backbone_rpn", "ssod::pseudo_labels", "ssod::detector_losses", "ssod::polisher_losses",
                 "ssod::backward"):
        assert f"| {part} |" in out, part
    run = mlflow_store.only_run("ssod-bench")
    metrics = run.data.metrics
    assert metrics["bench/nonfinite_steps"] == 0
    assert metrics["bench/polish_teacher_step_s"] > 0 and metrics["bench/polish_teacher_step_images_per_s"] > 0
    ratio = metrics["bench/ratio/polish_soft_teacher"]
    assert ratio == pytest.approx(metrics["bench/polish_teacher_step_s"] / metrics["bench/soft_teacher_step_s"])
    assert metrics["bench/eval_images_per_s"] > 0 and metrics["bench/eval_loader_images_per_s"] > 0
    assert "bench.md" in mlflow_store.artifacts(run.info.run_id)


@pytest.mark.slow
def test_bench_times_a_trained_checkpoint_with_its_pseudo_labels(tmp_path, dataset_cache, capsys, monkeypatch):
    """``--checkpoint`` loads student and teacher: the teacher's pseudo labels then exist and are counted."""
    from omegaconf import OmegaConf

    from ssod.build import build_model
    from ssod.checkpoint import save_checkpoint
    from ssod.config import compose
    from ssod.data.pipeline import build_data

    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "polish_teacher") if not o.startswith("method=")]
    cfg = compose(["method=polish_teacher", *overrides])
    classes = build_data(cfg.data, tmp_path, need_unlabeled=False).category_map.num_classes
    model = build_model(cfg.model, OmegaConf.to_object(cfg.method), classes)
    teacher = build_model(cfg.model, OmegaConf.to_object(cfg.method), classes)
    with torch.no_grad():  # a teacher sure of class 1 everywhere: every detection is a pseudo label
        teacher.detector.roi_heads.box_predictor.cls_score.bias[1] = 20.0
    save_checkpoint(tmp_path / "run", 40, {"step": 40, "student": model.state_dict(), "teacher": teacher.state_dict()})

    assert main(["--no-mlflow", "--repeats", "1", "--warmup", "1", "--eval-images", "4", "--checkpoint", str(tmp_path / "run"),
                 "--overrides", *overrides]) == 0
    out = capsys.readouterr().out
    assert "step 40" in out
    raw = float(out.split("pseudo labels per unlabeled image: ")[1].split(" raw")[0])
    assert raw > 0


def test_parts_are_timed_in_turn_with_their_own_medians():
    """Round-robin timing: after the warm-up rounds, one call of each part per round."""
    calls = []
    parts = {"slow": lambda: (calls.append("slow"), time.sleep(0.03)), "fast": lambda: calls.append("fast")}
    medians, peaks = interleaved_medians(parts, torch.device("cpu"), repeats=3, warmup=1)
    assert calls == ["slow", "fast"] * 4
    assert medians["slow"] >= 0.03 > medians["fast"]
    assert peaks == {}  # peak memory is measured on CUDA only


def test_the_polishing_part_leaves_no_gradients_for_the_next_part(tmp_path, dataset_cache, accelerator):
    """The parts take turns: the next part's optimizer step must not apply the polishing part's gradients."""
    import copy

    from omegaconf import OmegaConf

    from ssod.bench import _polishing
    from ssod.build import build_model
    from ssod.config import compose
    from ssod.data.pipeline import build_data
    from ssod.data.sampling import infinite_loader

    cfg = compose(tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "polish_teacher"))
    data = build_data(cfg.data, tmp_path, need_unlabeled=True)
    student = build_model(cfg.model, OmegaConf.to_object(cfg.method), data.category_map.num_classes)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    labeled = next(infinite_loader(data.labeled, 2, 0, 0, 1, 0, 0))[0]
    unlabeled = next(infinite_loader(data.unlabeled, 2, 1, 0, 1, 0, 0))[0]
    assert all(len(target["boxes"]) for _, target, _ in labeled)  # the polishing networks get samples
    _polishing(student, teacher, labeled, unlabeled, accelerator)()
    assert all(param.grad is None for param in student.parameters())


@pytest.mark.slow
def test_the_bench_times_training_own_step(tmp_path, dataset_cache, accelerator):
    """The polish_teacher part is ``ssod.step.train_step``: it moves the student and, by EMA,
    both parts of the teacher (the detector and the polishing networks); the soft_teacher
    part leaves the polishing networks alone. Each step records whether its loss was finite."""
    import copy

    from omegaconf import OmegaConf

    from ssod.bench import STEPS, as_labeled, training_parts
    from ssod.build import build_model
    from ssod.config import compose
    from ssod.data.pipeline import build_data
    from ssod.data.sampling import infinite_loader
    from ssod.run_state import RunState

    overrides = [o for o in tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db", "polish_teacher") if not o.startswith("method=")]
    cfg = compose(["method=polish_teacher", *overrides])
    data = build_data(cfg.data, tmp_path, need_unlabeled=True)
    torch.manual_seed(0)
    student = build_model(cfg.model, OmegaConf.to_object(cfg.method), data.category_map.num_classes).train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    labeled = next(infinite_loader(data.labeled, 2, 0, 0, 1, 0, 0))[0]
    unlabeled = next(infinite_loader(data.unlabeled, 2, 1, 0, 1, 0, 0))[0]
    nonfinite = {name: [] for name in STEPS}
    parts = training_parts(cfg, overrides, accelerator, student, teacher, labeled, unlabeled,
                           labeled + as_labeled(unlabeled), nonfinite, RunState())

    def snapshot(module):
        return [param.detach().clone() for param in module.parameters()]

    def moved(module, before):
        return any(not torch.equal(old, param) for old, param in zip(before, module.parameters()))

    polisher = snapshot(teacher.polisher)
    parts["soft_teacher step"]()
    assert not moved(teacher.polisher, polisher)
    detector, polisher, trained = snapshot(teacher.detector), snapshot(teacher.polisher), snapshot(student)
    parts["polish_teacher step"]()
    assert moved(student, trained) and moved(teacher.detector, detector) and moved(teacher.polisher, polisher)
    assert nonfinite["polish_teacher step"] == [False] and nonfinite["soft_teacher step"] == [False]


@pytest.mark.slow
def test_bench_compares_another_model_in_the_same_rounds(tmp_path, dataset_cache, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides(tmp_path, dataset_cache, "sqlite:///unused.db") if not o.startswith("method=")]
    assert main(["--no-mlflow", "--repeats", "1", "--warmup", "1", "--eval-images", "2",
                 "--compare-model", "efficientnet_lite0_fpn", "--overrides", *overrides]) == 0
    out = capsys.readouterr().out
    for step in ("supervised step (labeled)", "soft_teacher step", "polish_teacher step"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {step} [model=efficientnet_lite0_fpn] |"))
        assert float(row.split("|")[2]) > 0
        assert f"| {step} / same with efficientnet_lite0_fpn |" in out
    assert "WARNING" not in out
