"""Worker processes (``ssod.tuning.workers``, ``processes``): one budget shared, killed workers' trials retried, GPUs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tuning_project import Project, check_trial_runs, wait_for_checkpointed_trial, worker_pids


@pytest.mark.slow
def test_two_workers_share_one_budget_in_a_journal_file(project: Project) -> None:
    launcher = project.start(["--workers", "2", "--gpus", "cpu", "tune.n_trials=3"], "tune.log")
    project.finish(launcher)
    assert (project.root / "optuna.journal").is_file() and not (project.root / "optuna.db").exists()
    study = project.study(f"journal:{project.root / 'optuna.journal'}")
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 3
    assert len(worker_pids(study)) == 2, "both workers should have run trials"
    check_trial_runs(project, study)
    parent, runs = project.runs()
    assert len(runs) == 3 and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_killed_worker_trial_is_retried_with_same_params_from_its_checkpoint(project: Project) -> None:
    journal = f"journal:{project.root / 'optuna.journal'}"
    args = ["tune.n_trials=2", "train.iterations=4", "train.eval_every=4"]
    victim = project.start(["worker", "--index", "0", "--storage", journal, *args], "victim.log")
    survivor = project.start(["worker", "--index", "1", "--storage", journal, *args], "survivor.log")
    try:
        killed = wait_for_checkpointed_trial(project, journal, victim.pid, timeout=180)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        dead_run_id = newest_checkpoint_run_id(project, journal, killed)
        project.finish(survivor)
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
                process.wait()
    study = project.study(journal)
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == dead.params
    assert retry.user_attrs["resumed_from_step"] >= 1
    assert retry.user_attrs["output_dir"] == dead.user_attrs["output_dir"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    check_trial_runs(project, study)
    _, runs = project.runs()
    (resumed_run,) = [r for r in runs if r.info.run_id == retry.user_attrs["mlflow_run_id"]]
    assert resumed_run.data.tags["optuna.retry_of"] == str(killed)
    # The retry continued the dead trial's MLflow run (the one its checkpoint names), not a new one.
    assert resumed_run.info.run_id == dead_run_id
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == sorted(
        str(t.number) for t in study.get_trials(states=(TrialState.COMPLETE,)))


def newest_checkpoint_run_id(project: Project, journal: str, number: int) -> str:
    """The MLflow run that trial ``number``'s newest checkpoint belongs to."""
    import torch

    trial = project.study(journal).trials[number]
    checkpoint = max(Path(trial.user_attrs["output_dir"]).glob("checkpoints/step-*.pt"))
    run_id = torch.load(checkpoint, map_location="cpu", weights_only=False)["mlflow_run_id"]
    assert run_id
    return run_id


def test_relay_answers_are_read_in_order_and_a_missing_answer_times_out(tmp_path: Path) -> None:
    from ssod.tuning.child import wait_for_ack, write_ack

    relay = tmp_path / "trial-0.metrics.jsonl"
    assert wait_for_ack(relay, 1, timeout_s=0.1) is None  # no worker answer: the child goes on
    write_ack(relay, "continue")
    write_ack(relay, "stop")
    assert wait_for_ack(relay, 1, timeout_s=0.1) == "continue"
    assert wait_for_ack(relay, 2, timeout_s=0.1) == "stop"
    assert wait_for_ack(relay, 3, timeout_s=0.1) is None


def test_worker_gpus_are_indices_into_the_visible_devices(monkeypatch):
    """Under SLURM or docker CUDA_VISIBLE_DEVICES=2,3: the workers get 2 and 3 (or what
    --gpus picks from them), never the physical 0 and 1 someone else owns."""
    from ssod.tuning.workers import assign_devices, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert assign_devices(2, visible_gpus(None), per_trial=1) == ["2", "3"]
    assert visible_gpus(["1"]) == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,MIG-3c4d")
    assert visible_gpus(None) == ["GPU-1a2b", "MIG-3c4d"]
    with pytest.raises(ValueError, match=r"--gpus 2: give indices 0..1 into this process's CUDA_VISIBLE_DEVICES=GPU-1a2b,MIG-3c4d"):
        visible_gpus(["2"])
    assert visible_gpus([]) == []  # --gpus cpu
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus(["0", "1"]) == ["0", "1"]
