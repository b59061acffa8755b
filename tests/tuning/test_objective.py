"""Trials (``ssod.tuning.objective``): pruning, failures and interruptions, counted against the budget as they should."""

from __future__ import annotations

import statistics
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ssod.tune import main, prepare, run_worker
from tuning_project import Project, processes_matching


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
    assert not processes_matching("ssod.tune trial"), "the trial's process group outlived the prune"


def test_the_reporter_counts_from_the_unsupervised_start_and_never_prunes_the_final_evaluation() -> None:
    """Evaluations inside the burn-in are not reported; steps are counted from its end; the
    trial's last evaluation is a result, however the pruner judges it."""
    import optuna

    from ssod.tuning.objective import Reporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.0))
    trial = study.ask()
    reporter = Reporter(trial, "val/teacher/bbox_AP", first_step=400, last_step=700)
    reporter(200, {"val/teacher/bbox_AP": 0.1})
    reporter(400, {"val/teacher/bbox_AP": 0.1})
    reporter(700, {"val/teacher/bbox_AP": 0.2})  # below the threshold, but final: no prune
    study.tell(trial, 0.2)
    assert study.trials[0].intermediate_values == {300: 0.2}

    trial = study.ask()
    reporter = Reporter(trial, "val/teacher/bbox_AP", first_step=400, last_step=700)
    with pytest.raises(optuna.TrialPruned, match="step 500"):
        reporter(500, {"val/teacher/bbox_AP": 0.2})
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {100: 0.2}


def test_enqueued_configurations_run_first_with_the_base_config_filling_what_they_leave_out(project: Project) -> None:
    seen: list[dict] = []

    def trainer(cfg, on_eval):
        seen.append({"unsup_weight": cfg.method.unsup_weight, "rf_cls_thr": cfg.method.rf_cls_thr,
                     "reg_samples": cfg.method.reg_samples, "cls_scale": cfg.method.cls_scales[1]})
        on_eval(cfg.train.iterations, {"val/teacher/bbox_AP": 0.5})
        return {"val/teacher/bbox_AP": 0.5}

    setup = prepare(project.overrides + [
        "tune.n_trials=3", "+tune.enqueue.default={}",
        "+tune.enqueue.paper={method.unsup_weight: 3.0, method.rf_cls_thr: 0.9}",
    ])
    base = setup.space_defaults
    run_worker(setup, trainer=trainer)
    study = project.study(setup.storage_url)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs.get("ssod.enqueued") for t in trials] == ["default", "paper", None]
    assert seen[0] == {"unsup_weight": base["method.unsup_weight"], "rf_cls_thr": base["method.rf_cls_thr"],
                       "reg_samples": base["method.reg_samples"], "cls_scale": base["method.cls_scales.1"]}
    assert seen[1] == {**seen[0], "unsup_weight": 3.0, "rf_cls_thr": 0.9}
    # Joining the study again enqueues nothing more.
    run_worker(prepare(project.overrides + ["tune.n_trials=3", "+tune.enqueue.default={}"]), trainer=trainer)
    assert len(project.study(setup.storage_url).trials) == 3


def test_a_study_refuses_an_enqueued_key_it_does_not_search(project: Project) -> None:
    with pytest.raises(ValueError, match="tune.enqueue names keys outside tune.space: method.ema_momentum"):
        prepare(project.overrides + ["+tune.enqueue.paper={method.ema_momentum: 0.999}"])


def test_trials_continue_one_shared_burn_in_trained_once(project: Project) -> None:
    """tune.burn_in: the burn-in is trained once (a real tiny training), every trial starts
    from it with its schedule, and a second worker or study with the same base reuses it."""
    from ssod.checkpoint import load_checkpoint
    from ssod.tuning.burn_in import burn_in_dir

    starts: list[tuple[str, bool, int]] = []

    def trainer(cfg, on_eval):
        starts.append((cfg.train.init_from, cfg.train.init_continue, cfg.method.unsup_start))
        on_eval(cfg.train.iterations, {"val/teacher/bbox_AP": 0.5})
        return {"val/teacher/bbox_AP": 0.5}

    overrides = project.overrides + ["tune.n_trials=2", "tune.burn_in=2", "train.iterations=4"]
    setup = prepare(overrides)
    run_worker(setup, trainer=trainer)
    checkpoint = burn_in_dir(setup) / "checkpoints" / "step-00000002.pt"
    assert load_checkpoint(checkpoint)["step"] == 2
    assert starts == [(str(checkpoint), True, 2)] * 2
    made = checkpoint.stat().st_mtime_ns
    run_worker(prepare(overrides + ["tune.study_name=another", "tune.n_trials=1"]), trainer=trainer)
    assert checkpoint.stat().st_mtime_ns == made and len(starts) == 3 and starts[-1][0] == str(checkpoint)


def test_a_study_refuses_a_searched_key_the_shared_burn_in_makes_meaningless(project: Project) -> None:
    with pytest.raises(ValueError, match="searches method.unsup_start, which acts only during the shared burn-in"):
        prepare(project.overrides + ["tune.burn_in=2", "+tune.space={method.unsup_start: {type: int, low: 0, high: 4}}"])


def test_a_study_refuses_a_searched_key_the_trials_config_lacks(project: Project) -> None:
    with pytest.raises(ValueError, match="keys that the trials' config lacks: method.no_such_key"):
        prepare(project.overrides + ["+tune.space={method.no_such_key: {type: float, low: 0, high: 1}}"])


@pytest.mark.parametrize("bad, says", [
    ("tune.n_trials=[1,", "tune.n_trials=[1,"),
    ("train.no_such_key=1", "Could not override 'train.no_such_key'. To append to your config use +train.no_such_key=1"),
    ("tune.pruner.name=fastest", "fastest"),
    ("train.lr=abc", "Error merging override train.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("tune=no_such_study", "Could not find 'tune/no_such_study' Available options in 'tune': coco, method_lr, synthetic, tiny"),
])
def test_a_bad_override_is_one_error_line_and_status_2(project: Project, capsys, bad: str, says: str) -> None:
    assert main(["report", *project.overrides, bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssod-tune: error: ") and says in err[0], err


def test_trials_in_one_worker_leave_no_loader_workers_behind(project: Project) -> None:
    """Trial after trial in one process (completed and pruned ones): none keeps its loader
    workers (a real study's worker was killed for memory after 7 trials)."""
    import psutil

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    setup = prepare(project.overrides + ["tune.n_trials=3", "data.num_workers=1", "train.iterations=3",
                                         "tune.pruner.name=threshold", "tune.pruner.lower=0.99"])
    run_worker(setup)
    states = {t.state for t in project.study(setup.storage_url).trials}
    assert TrialState.PRUNED in states
    left = [child for child in psutil.Process().children(recursive=True)
            if child.pid not in before and child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"loader workers left alive after the study: {left}"
