"""Resuming and branching real runs: which checkpoint a resume takes, where a run may write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssod import checkpoint
from ssod.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3, 2), float(step)), "names": ["a", "b"], "nested": {"lr": 0.1}}


def test_a_fresh_run_refuses_a_folder_with_checkpoints(make_config, mlflow_store, tmp_path: Path):
    """Another run's checkpoints there would be resumed by ``resume=auto`` later (its
    weights, its step, its MLflow run): a fresh run says so and starts nothing."""
    from ssod.training import run

    folder = tmp_path / "outputs" / "checkpoints"
    save_checkpoint(folder, 300, _state(300))
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(newest: step-00000300\.pt\)"
                                              r".*train\.resume=auto.*train\.output_dir"):
        run(make_config("train.iterations=2"))
    assert mlflow_store.runs() == []
    assert [step for step, _ in list_checkpoints(folder)] == [300]


def test_resuming_an_older_checkpoint_by_path_branches_the_run_and_sets_the_later_ones_aside(
    make_config, mlflow_store, tmp_path: Path
):
    """Going back to step 2 of a run that reached 4 (a divergence, another learning rate):
    left in place, step 4 would be what ``resume=auto`` continues next time, and the reopened
    MLflow run would keep the abandoned values of steps 3-4. The later checkpoints move
    aside (nothing is deleted) and the branch gets its own run, tagged with its origin."""
    from ssod.training import run

    base = ("train.ckpt_every=1", "train.keep_checkpoints=10", "train.eval_every=4", "data.val_max_images=4",
            "train.log_every=1")
    run(make_config(*base, "train.iterations=4"))
    folder = tmp_path / "outputs" / "checkpoints"
    first = mlflow_store.only_run()
    assert first.data.tags["ssod.checkpoint_step"] == "4"
    abandoned = mlflow_store.history(first.info.run_id, "train/loss")
    old_step_4 = load_checkpoint(folder / "step-00000004.pt")["student"]

    run(make_config(*base, "train.iterations=4", "train.lr=0.02", f"train.resume={folder / 'step-00000002.pt'}"))
    (aside,) = [path for path in folder.iterdir() if path.is_dir()]
    assert aside.name.startswith("superseded-")
    # The best checkpoint (of the evaluation at step 4) was of the abandoned history too.
    assert sorted(path.name for path in aside.iterdir()) == ["best.json", "best.pt", "step-00000003.pt", "step-00000004.pt"]
    assert torch.equal(load_checkpoint(aside / "step-00000004.pt")["student"]["detector.roi_heads.box_predictor.cls_score.weight"],
                       old_step_4["detector.roi_heads.box_predictor.cls_score.weight"])
    assert [step for step, _ in list_checkpoints(folder)] == [1, 2, 3, 4]

    runs = {run_.info.run_id: run_ for run_ in mlflow_store.runs()}
    assert len(runs) == 2
    (branch_id,) = set(runs) - {first.info.run_id}
    branch = runs[branch_id]
    assert branch.data.tags["ssod.branched_from_run"] == first.info.run_id
    assert branch.data.tags["ssod.branched_from_step"] == "2"
    assert branch.info.run_name.endswith(" (from step 2)")
    assert mlflow_store.client.get_run(first.info.run_id).data.tags["ssod.branches"] == branch_id
    assert branch.data.params["train.lr"] == "0.02" and branch.info.status == "FINISHED"
    assert sorted(mlflow_store.steps(branch_id, "train/loss")) == [3, 4]
    # The branch trains at its own learning rate, not at the one in the checkpoint's optimizer.
    old_lr, new_lr = (mlflow_store.history(run_id, "train/lr") for run_id in (first.info.run_id, branch_id))
    for step in (3, 4):
        assert new_lr[step] == [pytest.approx(2 * old_lr[step][0])]
    assert mlflow_store.history(first.info.run_id, "train/loss") == abandoned  # the old run is left as it was
    assert load_checkpoint(folder / "step-00000004.pt")["mlflow_run_id"] == branch_id

    # The branch goes on as any run: resume=auto continues its newest checkpoint and its run.
    run(make_config(*base, "train.iterations=5", "train.lr=0.02", "train.resume=auto"))
    assert len(mlflow_store.runs()) == 2
    assert sorted(mlflow_store.steps(branch_id, "train/loss")) == [3, 4, 5]
    assert [path.name for path in folder.iterdir() if path.is_dir()] == [aside.name]


def test_going_back_checks_before_it_moves_and_a_branch_without_checkpoints_stays_a_branch(
    make_config, mlflow_store, tmp_path: Path
):
    from ssod.training import run

    base = ("train.ckpt_every=1", "train.keep_checkpoints=10", "train.eval_every=4", "data.val_max_images=4")
    run(make_config(*base, "train.iterations=3"))
    folder = tmp_path / "outputs" / "checkpoints"
    (first,) = mlflow_store.runs()
    # A config the checkpoint does not fit fails before any checkpoint moves or run starts.
    with pytest.raises(RuntimeError, match="state_dict"):
        run(make_config(*base, "train.iterations=3", "model.box_head_dim=96", f"train.resume={folder / 'step-00000001.pt'}"))
    assert [step for step, _ in list_checkpoints(folder)] == [1, 2, 3] and not [p for p in folder.iterdir() if p.is_dir()]
    assert len(mlflow_store.runs()) == 1
    # Going back to step 1 of a run that has no tag (made before there was one): the later
    # checkpoints on disk are enough to branch. This branch ends at once (already at its last
    # iteration) and writes no checkpoint, so the newest one left is still the old run's step 1:
    # resume=auto then goes back too (the old run's tag says 3), never into the old run.
    mlflow_store.client.delete_tag(first.info.run_id, "ssod.checkpoint_step")
    run(make_config(*base, "train.iterations=1", f"train.resume={folder / 'step-00000001.pt'}"))
    run(make_config(*base, "train.iterations=3", "train.resume=auto"))
    runs = mlflow_store.runs()
    assert len(runs) == 3
    for branch in (r for r in runs if r.info.run_id != first.info.run_id):
        assert branch.data.tags["ssod.branched_from_run"] == first.info.run_id
    assert sorted(mlflow_store.steps(first.info.run_id, "train/loss")) == [1, 2, 3]


def test_continuing_a_run_into_another_folder_is_not_going_back(make_config, mlflow_store, tmp_path: Path):
    """The newest checkpoint of run A, resumed into the folder of run B (further along):
    B's checkpoints say nothing of how far A went, so A continues as A (B's are set aside)."""
    from ssod.training import run

    base = ("train.ckpt_every=1", "train.keep_checkpoints=10", "train.eval_every=10", "data.val_max_images=2")
    run(make_config(*base, "train.iterations=2", "tracking.experiment=a"))
    run(make_config(*base, "train.iterations=3", f"train.output_dir={tmp_path / 'b'}"))
    newest_of_a = tmp_path / "outputs" / "checkpoints" / "step-00000002.pt"
    run(make_config(*base, "train.iterations=3", f"train.output_dir={tmp_path / 'b'}", f"train.resume={newest_of_a}",
                    "tracking.experiment=a"))
    (a,) = mlflow_store.runs("a")
    assert "ssod.branched_from_run" not in a.data.tags and sorted(mlflow_store.steps(a.info.run_id, "train/loss")) == [1, 2, 3]
    assert a.data.tags["ssod.checkpoint_step"] == "3"


def test_run_refuses_a_directory_another_training_holds_before_creating_its_mlflow_run(make_config, mlflow_store,
                                                                                          tmp_path: Path):
    from ssod.training import run

    other = checkpoint.DirectoryLock(tmp_path / "outputs" / "checkpoints")
    try:
        with pytest.raises(CheckpointError, match="in use by another training"):
            run(make_config("train.iterations=1"))
        assert mlflow_store.runs() == []
    finally:
        other.release()
