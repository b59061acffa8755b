"""The method benchmark chooses each method's phase learning rate through ``ssod-tune``: real
studies (a journal storage, trials as nested MLflow runs) on tiny arms, whose trials are the
arms themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssod.checkpoint import load_checkpoint
from tests.conftest import tiny_overrides
from tests.test_benchmark_table import _benchmark


@pytest.mark.slow
def test_the_learning_rate_is_chosen_by_ssod_tune_and_a_trial_is_the_arm_it_stands_for(
        tmp_path: Path, dataset_cache: Path, mlflow_uri: str, mlflow_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benchmark = _benchmark()
    tiny = [o for o in tiny_overrides(tmp_path, dataset_cache, mlflow_uri) if not o.startswith(("method=", "train.output_dir="))]
    args = benchmark.parse_args(["--profile", "cpu", "--num-train", "40", "--num-test", "4", "--seeds", "0", "--burn-in", "2",
                                 "--iterations", "2", "--unsup-warmup", "0", "--lr-grid", "0.1", "1.0", "--jobs", "1",
                                 "--outputs", str(tmp_path / "bench"), "--", *tiny, "data.val_max_images=4"])
    plan = benchmark.Plan(args, benchmark.plan_runs(args))
    selection = benchmark.select_with_tuner(plan, threads=1)

    assert selection is not None and selection["via"] == "ssod-tune"
    assert benchmark.selection_done(selection, args)
    assert set(selection["studies"]) == set(benchmark.SELECTED_METHODS)
    rows = selection["runs"]
    assert sorted((r["method"], r["lr_gamma"]) for r in rows) == sorted(
        (m, g) for m in benchmark.SELECTED_METHODS for g in (0.1, 1.0))
    for row in rows:  # the study's value is the trial's final validation teacher AP
        final = json.loads((Path(row["output_dir"]) / "final_metrics.json").read_text())
        assert row["val_teacher_AP"] == final["val/teacher/bbox_AP"] and final["step"] == 4
    assert selection["chosen"] == benchmark.choose_lr(rows)
    # Trials are nested runs of each method's study in the benchmark's experiment.
    parents = [r for r in mlflow_store.runs("ssod-method-benchmark") if r.data.tags.get("optuna.role") == "study"]
    assert sorted(r.data.tags["optuna.study"] for r in parents) == sorted(selection["studies"].values())

    # The chosen trial is its method's arm at that seed: recorded from the trial's folder, not trained again.
    total = args.burn_in + args.iterations
    for method, gamma in selection["chosen"].items():
        arm = benchmark.Run(method, 0.5, 0, gamma)
        assert plan.output_dir(arm.name).is_symlink()
        assert benchmark.record(plan, arm, total)["val_teacher_AP"] == next(
            r["val_teacher_AP"] for r in rows if r["method"] == method and r["lr_gamma"] == gamma)
    # ... because a trial trains exactly what the arm of its value trains: the other value's
    # supervised arm, trained by hand, ends with the trial's numbers bit for bit.
    other = next(g for g in (0.1, 1.0) if g != selection["chosen"]["supervised"])
    burn_in = benchmark.ensure_burn_in(plan, 0.5, 0, 1)
    by_hand = benchmark.run_arm(plan, benchmark.Run("supervised", 0.5, 0, other), burn_in, 1)
    trial = next(r for r in rows if r["method"] == "supervised" and r["lr_gamma"] == other)
    assert by_hand["val_teacher_AP"] == trial["val_teacher_AP"]
    hand_weights = load_checkpoint(plan.output_dir(benchmark.Run("supervised", 0.5, 0, other).name) / "checkpoints"
                                   / f"step-{total:08d}.pt")["student"]
    trial_weights = load_checkpoint(Path(trial["output_dir"]) / "checkpoints" / f"step-{total:08d}.pt")["student"]
    assert hand_weights.keys() == trial_weights.keys()
    assert all(torch.equal(hand_weights[name], trial_weights[name]) for name in hand_weights)
