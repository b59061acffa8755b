"""``ssod-eval``: a training checkpoint scored on the validation set, written as strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssod.eval import main
from ssod.training import run
from tests.conftest import tiny_overrides


def test_ssod_eval_scores_a_checkpoint_and_writes_strict_json(make_config, tmp_path: Path, dataset_cache, mlflow_uri):
    trained = run(make_config("train.iterations=1"))
    out = tmp_path / "metrics.json"
    overrides = tiny_overrides(tmp_path, dataset_cache, mlflow_uri)
    assert main([str(tmp_path / "outputs" / "checkpoints"), "--cpu", "--out", str(out), "--overrides", *overrides]) == 0

    def refuse(constant: str):
        pytest.fail(f"not strict JSON: {constant}")

    record = json.loads(out.read_text(), parse_constant=refuse)
    assert record["step"] == 1 and record["checkpoint"].endswith("checkpoints/best.pt")  # a folder: its best
    assert record["teacher/bbox_images"] == 8.0 and record["teacher/bbox_unreadable_images"] == 0.0
    assert None in record.values()  # a metric without ground truth (NaN) is null
    # The same teacher weights on the same images: the training run's final evaluation.
    for key in ("AP", "AP50", "AR100"):
        assert record[f"teacher/bbox_{key}"] == pytest.approx(trained[f"val/teacher/bbox_{key}"], rel=1e-6, abs=1e-9)


def test_ssod_eval_makes_a_user_error_one_line(tmp_path: Path, capsys):
    assert main([str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssod-eval: error: checkpoint={tmp_path / 'no-such-run'}: no such checkpoint file"]


def test_a_checkpoint_alone_is_enough_to_evaluate_it(make_config, tmp_path: Path, monkeypatch, capsys):
    """The run's config and categories travel in the checkpoint: no --overrides, and only the
    detector is loaded (a polish_teacher checkpoint: its polishing networks are not needed)."""
    trained = run(make_config("train.iterations=1", "model.fpn_channels=16", method="polish_teacher"))
    checkpoints = tmp_path / "outputs" / "checkpoints"
    assert "fpn_channels: 16" in (tmp_path / "outputs" / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # nowhere near the project's conf or data
    out = tmp_path / "metrics.json"
    assert main([str(checkpoints), "--cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["teacher/bbox_AP"] == pytest.approx(trained["val/teacher/bbox_AP"], rel=1e-6, abs=1e-9)
    capsys.readouterr()
    # A config that builds another model: one line that says so, not PyTorch's list of sizes.
    assert main([str(checkpoints), "--cpu", "--overrides", "model.fpn_channels=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the weights do not fit the model this config builds" in err[0]
    assert "leave out --overrides" in err[0]


def test_ssod_eval_saves_the_report_and_logs_it_into_the_checkpoints_run(make_config, tmp_path: Path, mlflow_store,
                                                                         capsys):
    """The table in %, detections, PR curves and confusion matrix, in a folder and in the
    training run's artifacts; the finished run already has the same report of its last evaluation."""
    trained = run(make_config("train.iterations=1", "model.box_score_thresh=0.0"))
    training_run = mlflow_store.only_run()
    artifacts = set(mlflow_store.artifacts(training_run.info.run_id))
    assert {f"evaluation/val/teacher/{name}" for name in ("per_class_ap.txt", "pr_curves.png",
                                                          "confusion_matrix.png")} <= artifacts
    capsys.readouterr()
    assert main([str(tmp_path / "outputs"), "--cpu"]) == 0
    printed = capsys.readouterr().out
    table = printed.splitlines()[0].split()
    assert table == ["class", "objects", "detections", "AP", "AP50", "AP75", "AR100"]
    overall = next(line for line in printed.splitlines() if line.startswith("all "))
    assert float(overall.split()[3]) == pytest.approx(100 * trained["val/teacher/bbox_AP"], abs=0.05)
    folder = tmp_path / "outputs" / "eval" / "val-teacher-step-00000001"
    assert {p.name for p in folder.iterdir()} == {"metrics.json", "detections.json", "per_class_ap.txt",
                                                 "pr_curves.png", "confusion_matrix.png"}
    detections = json.loads((folder / "detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    # The training run's final report is the same table (the same teacher on the same images).
    assert (folder / "per_class_ap.txt").read_text() == mlflow_store.read_text(
        training_run.info.run_id, "evaluation/val/teacher/per_class_ap.txt")
    logged = set(mlflow_store.artifacts(training_run.info.run_id)) - artifacts
    assert logged == {f"evaluation/val-teacher-step-00000001/{p.name}" for p in folder.iterdir()}
    assert len(mlflow_store.runs()) == 1 and f"logged to MLflow run {training_run.info.run_id}" in printed

    # --no-log: nothing more; --log with a run the store does not have: a run of its own.
    assert main([str(tmp_path / "outputs"), "--cpu", "--no-log", "--save-dir", str(tmp_path / "quiet")]) == 0
    assert set(mlflow_store.artifacts(training_run.info.run_id)) == artifacts | logged
    assert len(mlflow_store.runs()) == 1


def test_ssod_eval_log_gives_a_checkpoint_without_a_run_a_run_of_its_own(make_config, tmp_path: Path, mlflow_uri,
                                                                         mlflow_store):
    run(make_config("train.iterations=1", "tracking.enabled=false"))
    assert mlflow_store.runs() == []
    assert main([str(tmp_path / "outputs"), "--cpu", "--save-dir", str(tmp_path / "report")]) == 0
    assert mlflow_store.runs() == []  # no run known, no --log: nothing logged
    assert main([str(tmp_path / "outputs"), "--cpu", "--log", "--uri", mlflow_uri,
                 "--save-dir", str(tmp_path / "report")]) == 0
    only = mlflow_store.only_run()
    assert only.info.status == "FINISHED" and "teacher/bbox_AP" in only.data.metrics
    assert "evaluation/report/pr_curves.png" in mlflow_store.artifacts(only.info.run_id)
