"""``checkpoints/best.pt``: the checkpoint of the best evaluation (``train.best_metric``),
kept through rotation and resume, and what ssod-eval takes when given a run's folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ssod.checkpoint import BEST_NAME, BEST_RECORD, checkpoint_file, list_checkpoints, load_checkpoint
from ssod.config import ConfigError

BASE = ("train.iterations=6", "train.eval_every=2", "train.ckpt_every=6", "train.keep_checkpoints=1",
        "data.val_max_images=4", "train.lr=0.05")


def _best_of(history: dict[int, list[float]]) -> tuple[int, float]:
    """The step of the highest value (the earliest on a tie), as best.pt should hold."""
    step = min(history, key=lambda s: (-history[s][-1], s))
    return step, history[step][-1]


def test_best_pt_holds_the_best_evaluation_and_survives_rotation(make_config, mlflow_store, tmp_path: Path):
    from ssod.training import run

    run(make_config(*BASE, "train.best_metric=val/student/bbox_AR100"))
    folder = tmp_path / "outputs" / "checkpoints"
    finished = mlflow_store.only_run()
    history = mlflow_store.history(finished.info.run_id, "val/student/bbox_AR100")
    assert sorted(history) == [2, 4, 6]
    step, value = _best_of(history)
    record = json.loads((folder / BEST_RECORD).read_text())
    assert record == {"step": step, "metric": "val/student/bbox_AR100", "value": pytest.approx(value),
                      "checkpoint": f"step-{step:08d}.pt"}
    assert finished.data.tags["ssod.best_step"] == str(step)
    best = load_checkpoint(folder / BEST_NAME)
    assert best["step"] == step and best["best_step"] == step and best["best_value"] == pytest.approx(value)
    # keep_checkpoints=1: the newest step file only; best.pt is its own file when that is another step,
    # a second name for the same file (no second copy) when it is the same.
    assert [saved for saved, _ in list_checkpoints(folder)] == [6]
    assert os.path.samefile(folder / BEST_NAME, folder / "step-00000006.pt") == (step == 6)
    # A run's folder means its best checkpoint to the tools that evaluate and deploy one.
    assert checkpoint_file(str(tmp_path / "outputs"), "checkpoint", prefer_best=True) == folder / BEST_NAME
    assert checkpoint_file(str(tmp_path / "outputs"), "train.resume") == folder / "step-00000006.pt"


def test_a_resumed_run_keeps_its_best_as_the_uninterrupted_one(make_config, mlflow_store, tmp_path: Path):
    """Stopped at step 4 and resumed: the best value so far travels in the checkpoint, so
    step 6 replaces best.pt only if it beats the best of steps 2-4, as without the stop."""
    from ssod.training import run

    whole = tmp_path / "whole"
    run(make_config(*BASE, f"train.output_dir={whole}"))
    parts = tmp_path / "parts"
    run(make_config(*BASE, "train.iterations=4", "train.ckpt_every=4", f"train.output_dir={parts}"))
    run(make_config(*BASE, f"train.output_dir={parts}", "train.resume=auto"))
    records = [json.loads((folder / "checkpoints" / BEST_RECORD).read_text()) for folder in (whole, parts)]
    assert records[0] == records[1]
    assert load_checkpoint(parts / "checkpoints" / BEST_NAME)["step"] == records[0]["step"]


def test_no_best_metric_keeps_no_best_and_a_wrong_name_is_refused(make_config, mlflow_store, tmp_path: Path):
    from ssod.training import run

    run(make_config("train.iterations=2", "train.eval_every=2", "data.val_max_images=4", "train.best_metric="))
    assert not (tmp_path / "outputs" / "checkpoints" / BEST_NAME).exists()
    with pytest.raises(ConfigError, match=r"train\.best_metric=val/teacher/AP \(must be .*bbox_<AP\|AP50"):
        run(make_config("train.iterations=2", "train.best_metric=val/teacher/AP"))
