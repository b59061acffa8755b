"""Optuna storages (``ssod.tuning.storage``): defaults, never the MLflow database, PostgreSQL shared by workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from ssod.tune import main
from ssod.tuning.storage import check_not_mlflow, resolve_storage_url
from tuning_project import ENV_KEYS, Project, check_trial_runs, worker_pids


def test_storage_defaults_and_never_the_mlflow_database(tmp_path: Path, monkeypatch) -> None:
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert resolve_storage_url("", tmp_path, 1) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage_url("", tmp_path, 4) == f"journal:{tmp_path / 'optuna.journal'}"
    assert resolve_storage_url("sqlite:///studies/o.db", tmp_path, 1) == f"sqlite:///{tmp_path / 'studies/o.db'}"
    assert resolve_storage_url("postgresql://u:pw@db/optuna", tmp_path, 1) == "postgresql+psycopg2://u:pw@db/optuna"
    monkeypatch.setenv("SSOD_OPTUNA_STORAGE", "postgresql+psycopg2://u:pw@db/optuna")
    assert resolve_storage_url("", tmp_path, 1) == "postgresql+psycopg2://u:pw@db/optuna"

    mlflow_db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="MLflow"):
        check_not_mlflow(mlflow_db, mlflow_db)
    with pytest.raises(ValueError, match="MLflow") as refused:
        check_not_mlflow("postgresql+psycopg2://u:hunter2@db:5432/mlflow", "postgresql://u:hunter2@db:5432/mlflow")
    assert "hunter2" not in str(refused.value)
    check_not_mlflow("postgresql+psycopg2://u:pw@db:5432/optuna", "postgresql://u:pw@db:5432/mlflow")
    check_not_mlflow(f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_db)
    assert main(["--storage", mlflow_db, "tune=tiny", f"tracking.uri={mlflow_db}"]) == 2
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- tiny objectives


@pytest.mark.slow
def test_two_workers_share_one_budget_in_postgresql(project: Project, postgres_url: str) -> None:
    password = postgres_url.split(":")[2].split("@")[0]
    launcher = project.start(["--workers", "2", "--gpus", "cpu", "tune.n_trials=3"], "tune.log", env={"SSOD_OPTUNA_STORAGE": postgres_url})
    output = project.finish(launcher)
    assert not (project.root / "optuna.db").exists() and not (project.root / "optuna.journal").exists()
    study = project.study(postgres_url)
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 3
    assert len(worker_pids(study)) == 2, "both workers should have run trials"
    check_trial_runs(project, study)
    parent, _ = project.runs()
    assert parent.data.params["storage"].startswith("postgresql+psycopg2://ssod:***@127.0.0.1:")
    assert password not in output
    assert password not in str(parent.data.params) + str(parent.data.tags)


def _postgres(action: str, directory: Path) -> str:
    import subprocess

    from tuning_project import REPO

    done = subprocess.run(["bash", str(REPO / ".ci" / "postgres.sh"), action, str(directory)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _wait_for_running_trial_run(project: Project, process, timeout: float = 300) -> None:
    """Until a trial's MLflow run is RUNNING (its training has started)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.log_path.read_text()[-4000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(project.mlflow_uri)
        experiment = client.get_experiment_by_name("ssod")
        if experiment is not None and client.search_runs(
                [experiment.experiment_id], "tags.`optuna.role` = 'trial' and attributes.status = 'RUNNING'"):
            return
        time.sleep(0.3)
    raise AssertionError("no trial started:\n" + process.log_path.read_text()[-4000:])


@pytest.mark.slow
def test_a_worker_rides_out_a_database_restart_and_gives_up_in_one_line_past_its_limit(project: Project, tmp_path: Path):
    """PostgreSQL stopped for 20 s in the middle of a trial: the study goes on and completes
    (Optuna alone ended the worker within a second, its trial and the study's run left
    RUNNING). Stopped for longer than ``tune.storage_outage_s``: one line, exit 1, the study's
    and the trial's MLflow runs closed; the next ssod-tune finishes the study."""
    import time

    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    directory = Path(f"/tmp/ssod-pg-outage-{__import__('os').getpid()}")
    try:
        url = _postgres("start", directory).splitlines()[-1]
    except AssertionError as error:
        pytest.skip(f"PostgreSQL could not be started: {error}")
    env = {"SSOD_OPTUNA_STORAGE": url}
    slow_trials = ["train.iterations=12", "tune.grace_period=120"]
    try:
        launcher = project.start(["tune.n_trials=3", *slow_trials], "ride.log", env=env)
        _wait_for_running_trial_run(project, launcher)
        _postgres("down", directory)
        time.sleep(20)
        _postgres("up", directory)
        output = project.finish(launcher, timeout=600)
        assert "retrying for up to 120 s (tune.storage_outage_s)" in output and "answers again after" in output
        study = project.study(url)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        parent, trials = project.runs()
        assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in trials)

        launcher = project.start(["tune.n_trials=5", "tune.storage_outage_s=3", *slow_trials], "give-up.log", env=env)
        _wait_for_running_trial_run(project, launcher)
        _postgres("down", directory)
        started = time.monotonic()
        launcher.wait(timeout=120)
        waited = time.monotonic() - started
        _postgres("up", directory)
        output = launcher.log_path.read_text()
        assert launcher.returncode == 1, output[-4000:]
        errors = [line for line in output.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "did not answer for 3 s (tune.storage_outage_s)" in errors[0], output[-4000:]
        assert "Traceback" not in output and "UnboundLocalError" not in output
        assert waited < 60, waited  # one wait of the limit, not one per clean-up call
        parent, trials = project.runs()
        assert parent.info.status == "FAILED" and "did not answer" in parent.data.tags["mlflow.note.content"]
        assert not [r for r in trials if r.info.status == "RUNNING"]
        # The database back, the next ssod-tune re-queues the abandoned trial and finishes the study.
        output = project.finish(project.start(["tune.n_trials=5", *slow_trials[:1], "tune.grace_period=5"],
                                              "after.log", env=env), timeout=600)
        counted = [t for t in project.study(url).trials if t.state != TrialState.FAIL]
        assert [t.state for t in counted] == [TrialState.COMPLETE] * 5
    finally:
        _postgres("stop", directory)
        __import__("shutil").rmtree(directory, ignore_errors=True)
