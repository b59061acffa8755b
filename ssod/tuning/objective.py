"""One trial: suggest values, compose the config, train, report evaluations for pruning.

The trial's checkpoints live in ``<study dir>/trial-<original number>``: a trial retried
after its worker died has a new number but the same parameters, and with
``train.resume=auto`` it continues from the dead trial's newest checkpoint.

Outcomes: a finite metric -> COMPLETE; ``optuna.TrialPruned`` raised from ``on_eval`` ->
PRUNED (training checkpoints and stops at once); an exception, a missing or NaN metric
-> FAIL (returns NaN, never ``sys.exit``: the worker goes on); the worker told to stop
mid-trial (SIGTERM, Ctrl-C) -> ``TrialInterrupted`` (FAIL; the worker re-queues it, and
this does not count against ``tune.max_retry``; its MLflow run ends KILLED).

``launcher: accelerate`` runs each trial as ``accelerate launch ... -m ssod.tune trial``
in its own process group. The child appends one JSON line per evaluation to a relay file
that this worker tails to feed the pruner; on prune, SIGTERM or exit the worker
terminates the child's whole group, and the child stops itself if the worker vanishes.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from ssod.masking import mask_secrets
from ssod.tuning.child import TrialSpec, accelerate_command, ack_path, completed, read_relay, write_ack
from ssod.tuning.processes import group_alive, signal_group, terminate_group
from ssod.tuning.report import mark_trial_run, trial_tags
from ssod.tuning.settings import StudySetup
from ssod.tuning.space import override
from ssod.tuning.space import suggest, to_overrides
from ssod.tuning.storage import (
    INTERRUPTED_ATTR,
    OWNER_ATTR,
    SURPLUS_ATTR,
    StorageUnavailable,
    owner_record,
    quiet_experimental,
    storage_gave_up,
    within_budget,
)

log = logging.getLogger(__name__)

Trainer = Callable[..., dict]


class TrialInterrupted(Exception):
    """The worker was told to stop while this trial trained; its checkpoint is kept."""


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class Reporter:
    """``on_eval`` for ``ssod.training.run``: report the metric, raise ``TrialPruned`` if told.

    Steps are counted from ``first_step`` (the start of the unsupervised phase,
    ``method.unsup_start``): evaluations up to it (a burn-in the trial trains itself) are
    not reported, since there trials differ only by noise. The evaluation at ``last_step``
    (the trial's end) is reported but never pruned: a finished trial is a result.
    """

    def __init__(self, trial: optuna.Trial, metric: str, first_step: int = 0, last_step: Optional[int] = None) -> None:
        self.trial = trial
        self.metric = metric
        self.first_step = first_step
        self.last_step_of_trial = last_step
        self.last_step = 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = step
        value = metrics.get(self.metric)
        if not finite(value) or step <= self.first_step:
            return
        self.trial.report(float(value), step - self.first_step)
        final = self.last_step_of_trial is not None and step >= self.last_step_of_trial
        if not final and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric}={value:.4g}")

    @classmethod
    def for_config(cls, trial: optuna.Trial, metric: str, cfg) -> Reporter:
        """A reporter for a trial that trains ``cfg``."""
        return cls(trial, metric, int(cfg.method.unsup_start), int(cfg.train.iterations))


class Objective:
    """``study.optimize(Objective(...))``: one call trains one trial."""

    def __init__(self, setup: StudySetup, parent_run_id: str, stop: threading.Event, trainer: Optional[Trainer] = None) -> None:
        self.setup = setup
        self.tune = setup.tune
        self.parent_run_id = parent_run_id
        self.stop = stop
        self.trainer = trainer
        self.child: Optional[subprocess.Popen] = None
        self.last_trial: Optional[int] = None
        self.last_value: Optional[float] = None  # the finishing trial's value

    def __call__(self, trial: optuna.Trial) -> float:
        self.last_trial = trial.number  # first: an interrupt anywhere below re-queues this trial
        self.last_value = None
        if not within_budget(trial.study, trial.number, self.tune.n_trials):
            # Another worker took the last slot at the same moment: this one is not counted.
            log.info("trial %d: the budget is spent; not run (marked surplus)", trial.number)
            trial.set_user_attr(SURPLUS_ATTR, True)
            return float("nan")
        trial.set_user_attr(OWNER_ATTR, owner_record(trial.number))
        state, params, trial_dir = "FAIL", {}, None
        try:
            params = suggest(trial, self.tune.space)
            trial_dir, spec = self._prepare(trial, params)
            if self.stop.is_set():
                raise TrialInterrupted("stop requested before training")
            train = self._train_in_child if self.tune.launcher == "accelerate" else self._train_in_process
            metrics, completed = train(trial, spec, trial_dir)
            if not completed:
                raise TrialInterrupted("training stopped before its last iteration (SIGTERM?)")
            value = metrics.get(self.tune.metric)
            if not finite(value):
                trial.set_user_attr("fail_reason", f"{self.tune.metric} = {value}")
                return float("nan")
            state, self.last_value = "COMPLETE", float(value)
            return float(value)
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except StorageUnavailable:
            # Not the trial's fault: its MLflow run ends KILLED, marked interrupted, and the
            # trial (RUNNING in the database) is re-queued once its heartbeat is found stale.
            state = "INTERRUPTED"
            raise
        except (TrialInterrupted, KeyboardInterrupt):
            state = "INTERRUPTED"  # FAIL for Optuna; the worker re-queues it
            self.stop.set()
            # Recorded first: if the scheduler's SIGKILL cuts the clean-up short, whoever
            # re-queues the trial later (heartbeat, reaper) still sees it was stopped, not failed.
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        except Exception as error:  # noqa: BLE001 - any training error fails this trial only
            log.exception("trial %d failed", trial.number)
            trial.set_user_attr("fail_reason", mask_secrets(f"{type(error).__name__}: {error}")[:2000])
            return float("nan")
        finally:
            self._finish(trial, state, params, trial_dir)

    def _prepare(self, trial: optuna.Trial, params: dict) -> tuple[Path, TrialSpec]:
        """The trial's directory (a retry's is its original's) and what it trains."""
        with quiet_experimental():
            original = RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(trial))
        trial_dir = self._fresh_dir(trial.number) if original is None else self._dir_of(trial, original)
        resumed = _newest_checkpoint_step(trial_dir)
        trial.set_user_attr("output_dir", str(trial_dir))
        if resumed:
            trial.set_user_attr("resumed_from_step", resumed)
        retry = f" (retry of {original}, from step {resumed or 0})" if original is not None else ""
        log.info("trial %d%s: %s", trial.number, retry, params)
        tags = trial_tags(self.tune.study_name, trial.number, original)
        return trial_dir, TrialSpec(self._overrides(trial.number, trial_dir, params), tags)

    def _fresh_dir(self, number: int) -> Path:
        """``trial-<number>``, unless it holds checkpoints: another study's of the same name
        (in another storage, or deleted and made again) would be resumed with this trial's
        parameters and MLflow run. Then a directory of its own, recorded with the trial."""
        trial_dir = self.setup.study_dir / f"trial-{number:04d}"
        if _newest_checkpoint_step(trial_dir) is None:
            return trial_dir
        own = trial_dir.with_name(f"{trial_dir.name}-{uuid.uuid4().hex[:8]}")
        log.warning("%s holds another study's checkpoints (the same study_name elsewhere?): trial %d writes to %s",
                    trial_dir, number, own)
        return own

    def _dir_of(self, trial: optuna.Trial, original: int) -> Path:
        """A retry continues in the directory its original trial recorded."""
        for earlier in trial.study.get_trials(deepcopy=False):
            if earlier.number == original and earlier.user_attrs.get("output_dir"):
                return Path(earlier.user_attrs["output_dir"])
        return self.setup.study_dir / f"trial-{original:04d}"

    def _overrides(self, number: int, trial_dir: Path, params: dict) -> list[str]:
        return [
            "train.progress=false",
            # A trial keeps its checkpoint; a logged model per trial would fill the store
            # (a fixed override tracking.log_model=true asks for them).
            "tracking.log_model=false",
            *self.setup.fixed_overrides,
            *to_overrides(params),
            override("train.output_dir", str(trial_dir)),
            "train.resume=auto",
            override("train.run_name", f"{self.tune.study_name}-trial-{number}"),
            override("tracking.uri", self.setup.tracking_uri),
            override("tracking.experiment", self.setup.experiment),
            override("tracking.parent_run_id", self.parent_run_id),
        ]

    def _finish(self, trial: optuna.Trial, state: str, params: dict, trial_dir: Optional[Path]) -> None:
        try:
            run_id = mark_trial_run(self.setup, trial.number, state, params)
            if run_id and storage_gave_up(trial.study) is None:
                trial.set_user_attr("mlflow_run_id", run_id)
        except Exception:  # noqa: BLE001 - a tracking hiccup must not change the trial's outcome
            log.exception("trial %d: could not record its state in MLflow", trial.number)
        if trial_dir is not None and not self.tune.keep_checkpoints:
            self._drop_checkpoints(trial, state, trial_dir)

    def _drop_checkpoints(self, trial: optuna.Trial, state: str, trial_dir: Path) -> None:
        """Without ``tune.keep_checkpoints``: a pruned trial's checkpoints go at once; of the
        completed trials only the best keeps its own (``ssod-tune report`` names it, and a run
        can continue or evaluate it)."""
        if state == "PRUNED":
            shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
            return
        if state != "COMPLETE" or self.last_value is None:
            return
        maximize = self.tune.direction == "maximize"
        done = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if finite(t.value) and t.number != trial.number]
        values = [(t.value, t.user_attrs.get("output_dir")) for t in done] + [(self.last_value, str(trial_dir))]
        best = (max if maximize else min)(values, key=lambda pair: pair[0])[1]
        for _, directory in values:
            if directory and directory != best:
                shutil.rmtree(Path(directory) / "checkpoints", ignore_errors=True)

    def _train_in_process(self, trial: optuna.Trial, spec: TrialSpec, trial_dir: Path) -> tuple[dict, bool]:
        if self.trainer is None:
            from ssod.training import run as trainer
        else:
            trainer = self.trainer
        cfg = spec.config()
        reporter = Reporter.for_config(trial, self.tune.metric, cfg)
        metrics = trainer(cfg, on_eval=reporter)
        return metrics, completed(metrics, reporter.last_step, cfg.train.iterations)

    def _train_in_child(self, trial: optuna.Trial, spec: TrialSpec, trial_dir: Path) -> tuple[dict, bool]:
        trial_dir.mkdir(parents=True, exist_ok=True)
        spec_path, relay_path = trial_dir / f"trial-{trial.number}.json", trial_dir / f"trial-{trial.number}.metrics.jsonl"
        relay_path.unlink(missing_ok=True)
        ack_path(relay_path).unlink(missing_ok=True)
        spec.save(spec_path)
        reporter = Reporter.for_config(trial, self.tune.metric, spec.config())
        final: Optional[dict] = None
        self.child = subprocess.Popen(
            accelerate_command(self.tune.processes_per_trial, self.tune.accelerate_args, spec_path, relay_path),
            cwd=self.setup.project_dir,
            start_new_session=True,  # its own process group: one signal reaches every rank
        )
        try:
            offset = 0
            while True:
                # `accelerate launch` itself may exit before its ranks (it dies on SIGTERM):
                # the trial is over when the whole process group is gone.
                done = not group_alive(self.child)
                records, offset = read_relay(relay_path, offset)
                for record in records:
                    if record.get("final"):
                        final = record
                        continue
                    try:
                        reporter(record["step"], record["metrics"])
                    except optuna.TrialPruned:
                        write_ack(relay_path, "stop")
                        raise
                    write_ack(relay_path, "continue")
                if done:
                    break
                time.sleep(0.05)  # the child waits for each answer: poll often
        finally:
            child, self.child = self.child, None
            if group_alive(child):
                terminate_group(child)
        if final is None:
            raise RuntimeError(f"training exited with status {child.returncode} and no final metrics")
        return final["metrics"], bool(final["completed"])

    def forward_signal(self, signum: int) -> None:
        """Pass a stop signal on to the running child group (in-process training gets it anyway)."""
        if self.child is not None:
            signal_group(self.child.pid, signum)


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored record of a running trial (its system attrs say whether it is a retry)."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next(t for t in running if t.number == trial.number)


def _newest_checkpoint_step(trial_dir: Path) -> Optional[int]:
    from ssod.checkpoint import list_checkpoints

    found = list_checkpoints(trial_dir / "checkpoints")
    return found[-1][0] if found else None
