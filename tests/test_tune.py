"""Optuna studies (``ssod.tune``) on real storages: SQLite, a journal file, PostgreSQL.

Trials train for real (``tune=tiny``: two iterations on 40 tiny images) except where a
tiny pure-Python objective is enough (pruning decisions, failing trials). Worker
processes are real processes; one is SIGKILLed mid-trial. The PostgreSQL test starts a
throwaway server with ``.ci/postgres.sh`` and skips, saying why, only if it cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ssod.tune import main, prepare, run_worker
from ssod.tuning.settings import tune_config
from ssod.tuning.space import override
from ssod.tuning.space import suggest, to_overrides
from ssod.tuning.storage import check_not_mlflow, resolve_storage_url

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def project(tmp_path: Path, dataset_cache: Path, empty_mlflow_db: Path, monkeypatch) -> Project:
    """Uses conftest's session-wide dataset cache and empty MLflow store."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path, dataset_cache)


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


def test_space_becomes_overrides_that_compose(project: Project) -> None:
    setup = prepare(project.overrides + ["train.iterations=7"])
    assert setup.tune.study_name == STUDY and setup.tune.n_trials == 3
    assert setup.storage_url == f"sqlite:///{project.root / 'optuna.db'}"
    assert setup.fixed_overrides[-1] == "train.iterations=7"
    trial = optuna.trial.FixedTrial({
        "method.unsup_weight": 2.5, "method.rf_cls_thr": 0.75, "method.cls_scales.1": 0.125,
        "method.reg_samples": 12, "method.background_weighting": False,
    })
    params = suggest(trial, setup.tune.space)
    from ssod.config import compose

    awkward = "/tmp/a b/it's=[x],{y}"
    cfg = compose(setup.fixed_overrides + to_overrides(params) + [override("train.output_dir", awkward)])
    assert cfg.train.output_dir == awkward
    assert cfg.method.unsup_weight == 2.5 and cfg.method.rf_cls_thr == 0.75
    assert list(cfg.method.cls_scales) == [0.06, 0.125]
    assert cfg.method.reg_samples == 12 and cfg.method.background_weighting is False
    assert cfg.train.iterations == 7

    with pytest.raises(ValueError, match="needs low <= high"):
        tune_config({"space": {"method.unsup_weight": {"type": "float", "low": 2.0}}})
    with pytest.raises(ValueError, match="log needs low > 0"):
        tune_config({"space": {"method.unsup_weight": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}})
    with pytest.raises(ValueError, match="pruner.name"):
        tune_config({"pruner": {"name": "sometimes"}})


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


def test_pruning_stops_weak_trials_at_the_step_it_decides(project: Project) -> None:
    """A tiny objective whose curve is ``unsup_weight * step``: low weights get pruned."""
    ran: dict[float, int] = {}

    def trainer(cfg, on_eval):
        weight = cfg.method.unsup_weight
        for step in range(1, cfg.train.iterations + 1):
            ran[weight] = step
            on_eval(step, {"val/teacher/bbox_AP": weight * step})
        return {"val/teacher/bbox_AP": weight * cfg.train.iterations}

    setup = prepare(project.overrides + [
        "tune.n_trials=12", "tune.sampler.name=random", "tune.pruner.n_startup_trials=3", "train.iterations=8",
    ])
    usage = run_worker(setup, trainer=trainer)
    study = project.study(setup.storage_url)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert usage.used == 12 and len(pruned) + len(complete) == 12
    assert pruned, "no trial was pruned"
    for trial in pruned:
        decided_at = max(trial.intermediate_values)
        assert decided_at < 8
        assert ran[trial.params["method.unsup_weight"]] == decided_at, "training went on after the prune"
        earlier = [t.intermediate_values[decided_at] for t in complete if t.number < trial.number]
        assert trial.intermediate_values[decided_at] < statistics.median(earlier)


def test_failing_trials_fail_alone_and_count_against_the_budget(project: Project) -> None:
    calls = []

    def trainer(cfg, on_eval):
        calls.append(cfg.method.unsup_weight)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        if len(calls) == 2:
            on_eval(cfg.train.iterations, {"val/teacher/bbox_AP": float("nan")})
            return {"val/teacher/bbox_AP": float("nan")}
        on_eval(cfg.train.iterations, {"val/teacher/bbox_AP": 0.5})
        return {"val/teacher/bbox_AP": 0.5}

    setup = prepare(project.overrides + ["tune.n_trials=4"])
    run_worker(setup, trainer=trainer)
    trials = project.study(setup.storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "out of memory" in trials[0].user_attrs["fail_reason"]
    assert "nan" in trials[1].user_attrs["fail_reason"]


def test_interrupted_trials_are_requeued_without_counting_against_max_retry(project: Project) -> None:
    """A preemptible cluster may stop one trial more often than ``tune.max_retry``: each stop
    re-queues it with its parameters and its original's number, and only real failures
    (a dead worker) use up retries."""
    from ssod.tracking import Tracker
    from ssod.training import RunResult
    from ssod.tuning.storage import INTERRUPTED_ATTR, INTERRUPTED_TRIALS
    from ssod.tuning.workers import StaleTrials

    calls, run_ids = [], []

    def trainer(cfg, on_eval):
        """As training does: one MLflow run, reopened by each retry (from its checkpoint)."""
        calls.append(cfg.method.unsup_weight)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        run_ids.append(tracker.start(cfg.train.run_name, dict(cfg.tracking.tags), cfg.tracking.parent_run_id,
                                     run_id=run_ids[0] if run_ids else ""))
        if len(calls) <= 3:  # stopped by the worker's SIGTERM: checkpoint, run KILLED, not completed
            tracker.end("KILLED")
            stopped = RunResult()
            stopped.status = "KILLED"
            return stopped
        on_eval(cfg.train.iterations, {"val/teacher/bbox_AP": 0.5})
        tracker.end("FINISHED")
        return {"val/teacher/bbox_AP": 0.5}

    setup = prepare(project.overrides + ["tune.n_trials=1", "tune.max_retry=1"])
    for _ in range(3):  # each stop ends the worker; the same command again continues
        usage = run_worker(setup, trainer=trainer)
        assert usage.used == 1 and usage.waiting == 1
        stopped = project.runs()[1][0]
        assert (stopped.info.status, stopped.data.tags["optuna.state"], stopped.data.tags["optuna.interrupted"]) == (
            "KILLED", "FAIL", "true")
    usage = run_worker(setup, trainer=trainer)
    trials = project.study(setup.storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert calls == [calls[0]] * 4
    assert trials[3].system_attrs["failed_trial"] == 0
    assert trials[3].system_attrs["retry_history"] == [0, 1, 2] == trials[3].system_attrs[INTERRUPTED_TRIALS]
    assert all(t.user_attrs[INTERRUPTED_ATTR] for t in trials[:3]) and INTERRUPTED_ATTR not in trials[3].user_attrs
    assert {t.user_attrs["output_dir"] for t in trials} == {trials[0].user_attrs["output_dir"]}
    assert usage.used == 1 and usage.complete == 1 and usage.failed == 0
    (finished,) = project.runs()[1]
    assert finished.info.status == "FINISHED" and finished.data.tags["optuna.state"] == "COMPLETE"
    assert "optuna.interrupted" not in finished.data.tags

    # After those stops the chain still has its one retry for a dead worker, and no more;
    # a worker killed while it cleaned up after a stop (the trial marked interrupted) is a stop.
    study = project.study(setup.storage_url)
    on_stale = StaleTrials(setup)
    chain = dict(trials[3].system_attrs)
    for interrupted, expected_queued in ((False, True), (True, True), (False, False)):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.FAIL, params=trials[0].params, distributions=trials[0].distributions, system_attrs=chain,
            user_attrs={INTERRUPTED_ATTR: True} if interrupted else {},
        ))
        on_stale(study, study.trials[-1])  # as the heartbeat and the reaper call it
        queued = study.get_trials(states=(TrialState.WAITING,))
        assert bool(queued) == expected_queued
        if queued:
            assert queued[0].system_attrs["failed_trial"] == 0 and queued[0].params == trials[0].params
            assert INTERRUPTED_ATTR not in queued[0].user_attrs
            chain = dict(queued[0].system_attrs)
            study.tell(study.ask().number, state=TrialState.FAIL)  # pop it, so the next check sees none


def test_the_report_names_a_tie_for_best_and_drops_it_once_broken(project: Project) -> None:
    from mlflow.tracking import MlflowClient

    from ssod.tuning.report import parent_run, write_report

    setup = prepare(project.overrides)
    parent = parent_run(setup)
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(0.5, 4.0)
    for value in (0.5, 0.5):
        study.add_trial(optuna.trial.create_trial(params={"method.unsup_weight": value * 2},
                                                  distributions={"method.unsup_weight": distribution}, value=value))
    assert write_report(setup, study, parent)["best_tied_trials"] == 2
    assert MlflowClient(project.mlflow_uri).get_run(parent).data.tags["optuna.best_tied_trials"] == "2"
    study.add_trial(optuna.trial.create_trial(params={"method.unsup_weight": 3.0},
                                              distributions={"method.unsup_weight": distribution}, value=0.9))
    assert "best_tied_trials" not in write_report(setup, study, parent)
    assert "optuna.best_tied_trials" not in MlflowClient(project.mlflow_uri).get_run(parent).data.tags


# --------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_sqlite_study_completes_with_nested_mlflow_runs(project: Project) -> None:
    # Left by another study of the same name (another storage, or deleted and made again):
    # trial 0 must not resume it with its own parameters.
    from ssod.checkpoint import save_checkpoint

    foreign = save_checkpoint(project.root / "outputs/tune" / STUDY / "trial-0000" / "checkpoints", 2, {"step": 2})
    assert main(project.overrides) == 0
    assert (project.root / "optuna.db").is_file()
    study = project.study(f"sqlite:///{project.root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    check_trial_runs(project, study)
    parent, runs = project.runs()
    assert len(runs) == 3 and parent.info.status == "FINISHED"
    best = max(study.trials, key=lambda t: t.value)
    best_run = {r.data.tags["optuna.trial_number"]: r.info.run_id for r in runs}[str(best.number)]
    assert parent.data.tags["optuna.best_run_id"] == best_run
    assert parent.data.tags["optuna.best_params.method.rf_cls_thr"] == str(best.params["method.rf_cls_thr"])
    artifacts = set(project.artifacts(parent.info.run_id))
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert f"plots/{plot}.png" in artifacts
    tied = sum(t.value == best.value for t in study.trials)
    assert parent.data.tags.get("optuna.best_tied_trials") == (str(tied) if tied > 1 else None)
    from mlflow.tracking import MlflowClient

    table = Path(MlflowClient(project.mlflow_uri).download_artifacts(parent.info.run_id, "study/trials.csv"))
    header = table.read_text().splitlines()[0].split(",")
    assert {"number", "state", "value", "user_attrs_mlflow_run_id", "params_method.rf_cls_thr"} <= set(header)
    assert not [column for column in header if column.startswith("system_attrs_tpe")], header
    assert set((project.root / "outputs/tune" / STUDY).glob("trial-*/checkpoints/*.pt")) == {foreign}
    first = study.trials[0]
    assert "resumed_from_step" not in first.user_attrs
    assert Path(first.user_attrs["output_dir"]).name.startswith("trial-0000-")
    assert study.metric_names == ["val/teacher/bbox_AP"]  # optuna-dashboard's axis label

    # ``report`` only reads: the study tuned last when none is named, a clear refusal for one
    # that does not exist, and never a new study, storage or MLflow run.
    unnamed = [o for o in project.overrides if not o.startswith("tune=")]
    assert main(["report", *unnamed]) == 0
    assert main(["report", *project.overrides, "tune.study_name=nope"]) == 2
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{project.root / 'optuna.db'}")] == [STUDY]
    again, rerun = project.runs()
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED" and len(rerun) == 3
    elsewhere = project.root / "elsewhere"
    elsewhere.mkdir()
    assert main(["report", *unnamed, f"--storage=sqlite:///{elsewhere / 'optuna.db'}"]) == 2
    assert not (elsewhere / "optuna.db").exists()


@pytest.mark.slow
def test_pruned_trial_under_accelerate_launch_stops_its_child_at_once(project: Project) -> None:
    """launcher=accelerate: evaluations are relayed from the child; a prune kills its group."""
    assert main(project.overrides + [
        "tune.n_trials=1", "tune.launcher=accelerate", "tune.keep_checkpoints=true",
        "tune.pruner.name=threshold", "tune.pruner.lower=2.0", "train.iterations=6",
    ]) == 0
    (trial,) = project.study(f"sqlite:///{project.root / 'optuna.db'}").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    # The child learns of the prune at its next step: it checkpoints there and stops.
    steps = sorted(int(p.stem[5:]) for p in (Path(trial.user_attrs["output_dir"]) / "checkpoints").glob("step-*.pt"))
    assert steps and steps[-1] <= 2, f"training went on after the prune: checkpoints {steps}"
    _, (run,) = project.runs()
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
    assert not _processes_matching("ssod.tune trial"), "the trial's process group outlived the prune"


def _processes_matching(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


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
        killed = _wait_for_checkpointed_trial(project, journal, victim.pid, timeout=180)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
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


def _wait_for_checkpointed_trial(project: Project, journal: str, pid: int, timeout: float) -> int:
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


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    directory = Path(f"/tmp/ssod-pg-{os.getpid()}")
    script = REPO / ".ci" / "postgres.sh"
    try:
        started = subprocess.run(["bash", str(script), "start", str(directory)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("PostgreSQL could not be started: .ci/postgres.sh timed out")
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL could not be started (.ci/postgres.sh exit {started.returncode}): {started.stderr[-800:]}")
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(script), "stop", str(directory)], capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


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
