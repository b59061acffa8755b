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
