"""A tiny project on real storages for the tuning tests, and checks of its trials' MLflow runs."""


from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState


REPO = Path(__file__).resolve().parents[2]
STUDY = "tiny"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "SSOD_OPTUNA_STORAGE", "_SSOD_TUNE_STORAGE")


# --------------------------------------------------------------------------- helpers


class Project:
    """A project directory with its own MLflow store; runs ``ssod-tune`` in it."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.overrides = [f"tune={STUDY}", f"data.cache_dir={cache}", f"tracking.uri={self.mlflow_uri}"]
        self.env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        self.env["PYTHONUNBUFFERED"] = "1"

    def start(self, args: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        """``python -m ssod.tune <args> <tiny overrides>`` in the background."""
        log = open(self.root / log_name, "w")
        command = [sys.executable, "-m", "ssod.tune", *args, *self.overrides]
        process = subprocess.Popen(
            command, cwd=self.root, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        process.log_path = self.root / log_name
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 400) -> str:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"timed out:\n{process.log_path.read_text()[-6000:]}")
        output = process.log_path.read_text()
        assert process.returncode == 0, output[-6000:]
        return output

    def study(self, storage) -> optuna.Study:
        if isinstance(storage, str) and storage.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            storage = optuna.storages.JournalStorage(JournalFileBackend(storage.removeprefix("journal:")))
        return optuna.load_study(study_name=STUDY, storage=storage)

    def runs(self) -> tuple:
        """(parent run, trial runs) of the study in MLflow."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow_uri)
        experiment = client.get_experiment_by_name("ssod")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("optuna.role") == "study"]
        assert len(parents) == 1, [r.data.tags for r in runs]
        trials = [r for r in runs if r.data.tags.get("optuna.role") == "trial"]
        return parents[0], trials

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow_uri)
        found = []
        for info in client.list_artifacts(run_id, path):
            found.extend(self.artifacts(run_id, info.path) if info.is_dir else [info.path])
        return found


def check_trial_runs(project: Project, study: optuna.Study) -> None:
    """Every finished trial has one nested run whose tags, status and params match it."""
    parent, runs = project.runs()
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.study"] == STUDY
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == status[trial.state]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert "val/teacher/bbox_AP" in run.data.metrics
        for name, value in trial.params.items():
            assert run.data.params[f"optuna.{name}"] == str(value)
        assert float(run.data.params["method.unsup_weight"]) == pytest.approx(trial.params["method.unsup_weight"])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def worker_pids(study: optuna.Study) -> set[int]:
    return {t.user_attrs["worker"]["pid"] for t in study.get_trials(states=(TrialState.COMPLETE,))}


# --------------------------------------------------------------------------- config, space, storage rules


def processes_matching(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def wait_for_checkpointed_trial(project: Project, journal: str, pid: int, timeout: float) -> int:
    """Number of a RUNNING trial of worker ``pid`` once it has written a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (project.root / "optuna.journal").exists():
            for trial in project.study(journal).get_trials(states=(TrialState.RUNNING,)):
                owner = trial.user_attrs.get("worker", {})
                if owner.get("pid") == pid and list(Path(trial.user_attrs.get("output_dir", "/nonexistent")).glob("checkpoints/step-*.pt")):
                    return trial.number
        time.sleep(0.3)
    raise AssertionError("the victim never checkpointed a trial:\n" + (project.root / "victim.log").read_text()[-4000:])


# --------------------------------------------------------------------------- PostgreSQL
