"""Workers run trials until the shared budget is spent; ``launch`` starts N of them here.

A worker loops: reap trials of dead workers, count the budget in the storage, run one
trial (``study.optimize(n_trials=1)``, so RDB heartbeats run), repeat. When the budget is
spent but trials still run elsewhere it waits (``wait_for_running``), because one of them
may die and come back as a re-queued trial. SIGTERM/Ctrl-C: the current trial saves a
checkpoint and is re-queued, then the worker exits.

``launch`` with ``--workers N`` starts N ``ssod-tune worker`` processes on this machine,
each with its own ``CUDA_VISIBLE_DEVICES`` (empty for CPU), restarts a worker that
crashed, forwards SIGTERM, and writes the report when all are done.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from typing import Optional

import optuna

from ssod.tuning.burn_in import with_shared_burn_in
from ssod.tuning.objective import Objective, TrialInterrupted, Trainer
from ssod.tuning.report import end_parent_run, mark_trial_run, parent_run, write_report
from ssod.tuning.settings import PrunerSpec, SamplerSpec, StudySetup
from ssod.tuning.storage import (
    ENQUEUED_ATTR,
    INTERRUPTED_ATTR,
    INTERRUPTED_TRIALS,
    RESOLVED_ENV,
    StorageUnavailable,
    Usage,
    is_journal,
    open_storage,
    quiet_experimental,
    reap_dead_workers,
    storage_gave_up,
    usage,
)

log = logging.getLogger(__name__)


class StaleTrials:
    """Re-queue a trial that did not finish, with its parameters; close its run.

    As Optuna's ``RetryHeartbeatStaleTrialCallback`` (the same system attributes:
    ``failed_trial``, the original's number, and ``retry_history``, so its helpers and the
    budget count read them), except that a trial stopped on request (a scheduler's
    SIGTERM, Ctrl-C) is not a failure: only the others count against ``tune.max_retry``.
    A preemptible cluster may stop one trial many times in a long study.
    """

    def __init__(self, setup: StudySetup) -> None:
        self.setup = setup

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, interrupted: bool = False) -> None:
        """``interrupted``: this worker stopped the trial itself, and its objective has closed
        the trial's run; otherwise (the heartbeat, the reaper) the run is closed here."""
        stopped_on_request = interrupted or bool(trial.user_attrs.get(INTERRUPTED_ATTR))
        attrs = dict(trial.system_attrs)
        history = [*attrs.get("retry_history", ()), trial.number]
        stopped = [*attrs.get(INTERRUPTED_TRIALS, ()), *([trial.number] if stopped_on_request else [])]
        failures = len(history) - len(stopped)
        if failures > self.setup.tune.max_retry:
            log.warning("trial %d failed %d times (tune.max_retry=%d): not re-queued",
                        trial.number, failures, self.setup.tune.max_retry)
        else:
            attrs.update({"failed_trial": attrs.get("failed_trial", trial.number), "retry_history": history,
                          INTERRUPTED_TRIALS: stopped})
            inherited = {key: value for key, value in trial.user_attrs.items() if key != INTERRUPTED_ATTR}
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                user_attrs=inherited, system_attrs=attrs,
            ))
        if interrupted:
            return
        try:
            mark_trial_run(self.setup, trial.number, "INTERRUPTED" if stopped_on_request else "FAIL")
        except Exception:  # noqa: BLE001 - the re-queue matters more than the run's status
            log.exception("trial %d: could not mark its MLflow run", trial.number)


def build_sampler(spec: SamplerSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with ``seed + offset`` (see ``open_study``)."""
    seed = None if spec.seed is None else spec.seed + offset
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with quiet_experimental():
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.n_startup_trials, multivariate=spec.multivariate, constant_liar=spec.constant_liar
        )


def build_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.name == "none":
        return optuna.pruners.NopPruner()
    if spec.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(spec.min_resource, spec.reduction_factor,
                                                      spec.min_early_stopping_rate)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(spec.min_resource, spec.max_resource, spec.reduction_factor)
    if spec.name == "threshold":
        return optuna.pruners.ThresholdPruner(spec.lower, spec.upper, spec.n_warmup_steps, spec.interval_steps)
    return optuna.pruners.MedianPruner(spec.n_startup_trials, spec.n_warmup_steps, spec.interval_steps)


def open_study(setup: StudySetup, worker_index: int = 0) -> optuna.Study:
    """Create the study or join it (``load_if_exists``): workers may start at any time.

    A fixed seed alone would make every worker, and every restart, draw the same random
    start-up values, so the seed is offset by the trials already in the study, the worker
    index and, for a storage shared by machines, the host. A fresh one-worker study
    keeps exactly ``sampler.seed``.
    """
    tune = setup.tune
    storage = open_storage(setup.storage_url, tune.heartbeat_interval, tune.grace_period, StaleTrials(setup),
                           tune.storage_outage_s)
    study = optuna.create_study(
        study_name=tune.study_name,
        storage=storage,
        pruner=build_pruner(tune.pruner),
        direction=tune.direction,
        load_if_exists=True,
    )
    if not study.metric_names:  # optuna-dashboard labels its axis with it, not "Objective 0"
        with quiet_experimental():
            study.set_metric_names([tune.metric])
    enqueue_named(study, setup)
    local = is_journal(setup.storage_url) or setup.storage_url.startswith("sqlite:")
    host = 0 if local else zlib.crc32(os.uname().nodename.encode()) % 1000 * 1_000_000
    study.sampler = build_sampler(tune.sampler, len(study.get_trials(deepcopy=False)) + 10_000 * worker_index + host)
    return study


def enqueue_named(study: optuna.Study, setup: StudySetup) -> None:
    """``tune.enqueue`` (and ``tune.enqueue_grid``), once: into a study that has no trial yet
    (a worker joining later, or a restart, finds them there). Workers on several machines that create the study in the
    same second could both enqueue; ``ssod-tune --workers N`` enqueues before it starts them."""
    if not (setup.tune.enqueue or setup.tune.enqueue_grid) or study.get_trials(deepcopy=False):
        return
    for name, params in setup.enqueued_params():
        study.enqueue_trial(params, user_attrs={ENQUEUED_ATTR: name}, skip_if_exists=True)
        log.info("enqueued the %s configuration: %s", name, params)


def run_worker(
    setup: StudySetup, worker_index: int = 0, trainer: Optional[Trainer] = None, stop: Optional[threading.Event] = None
) -> Usage:
    """Run trials of the study until the budget is spent or ``stop`` is set (SIGTERM/SIGINT
    set it); returns the study's usage. ``trainer(cfg, on_eval) -> metrics`` defaults to
    ``ssod.training.run``.
    """
    setup = with_shared_burn_in(setup)
    tune = setup.tune
    stop = stop or threading.Event()
    on_stale = StaleTrials(setup)
    study = open_study(setup, worker_index)
    objective = Objective(setup, parent_run(setup), stop, trainer)
    heartbeat = not is_journal(setup.storage_url)
    deadline = time.monotonic() + tune.timeout_s if tune.timeout_s else None
    restore = _handle_signals(stop, objective)
    waiting_for = 0
    try:
        while not stop.is_set():
            reap_dead_workers(study, on_stale, None if heartbeat else tune.grace_period)
            if heartbeat:
                with quiet_experimental():
                    optuna.storages.fail_stale_trials(study)
            now = usage(study)
            late = deadline is not None and time.monotonic() > deadline
            if (now.used < tune.n_trials or now.waiting) and not late:
                try:
                    study.optimize(objective, n_trials=1, gc_after_trial=True)
                except (TrialInterrupted, KeyboardInterrupt) as error:
                    log.warning("trial %s interrupted (%s): re-queued; worker stops", objective.last_trial, type(error).__name__)
                    _requeue(study, objective.last_trial, on_stale)
                    break
                except Exception:
                    # The database stayed away past tune.storage_outage_s: whatever Optuna's
                    # clean-up raised on top of it, that is the news. The trial stays RUNNING
                    # in the database; its heartbeat goes stale and another worker re-queues it.
                    unavailable = storage_gave_up(study)
                    if unavailable is not None:
                        raise unavailable from None
                    raise
                continue
            if now.running == 0 or not tune.wait_for_running or late:
                break
            if now.running != waiting_for:
                log.info("budget spent; waiting for %d trial(s) running elsewhere", now.running)
                waiting_for = now.running
            stop.wait(tune.poll_interval_s)
    finally:
        restore()
    return usage(study)


def _requeue(study: optuna.Study, number: Optional[int], on_stale: StaleTrials) -> None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if trial.number == number:
            on_stale(study, copy.deepcopy(trial), interrupted=True)


def _handle_signals(stop: threading.Event, objective: Objective):
    """SIGTERM/SIGINT: finish cleanly (a second Ctrl-C raises at once). Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after a checkpoint", signum)
        stop.set()
        objective.forward_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(signum, handler) for signum, handler in previous.items()]


def visible_gpus(gpus: Optional[list[str]]) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries for the workers: ``gpus`` (``--gpus``; None:
    all) are indices into this process's visible GPUs. Under SLURM or docker,
    ``CUDA_VISIBLE_DEVICES=2,3`` makes ``--gpus 0`` GPU 2, not someone else's GPU 0; its
    entries (ids, UUIDs, MIG names) are passed on as they are."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if not visible:
        if gpus is not None:
            return gpus
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if gpus is None:
        return visible
    try:
        return [visible[int(index)] for index in gpus]
    except (ValueError, IndexError):
        raise ValueError(
            f"--gpus {','.join(gpus)}: give indices 0..{len(visible) - 1} into this process's "
            f"CUDA_VISIBLE_DEVICES={','.join(visible)}"
        ) from None


def assign_devices(workers: int, gpus: Optional[list[str]], per_trial: int) -> list[Optional[str]]:
    """``CUDA_VISIBLE_DEVICES`` per worker: None leaves it alone, '' means CPU."""
    if gpus is None:
        return [None] * workers
    if not gpus:
        return [""] * workers
    groups = [gpus[i : i + per_trial] for i in range(0, len(gpus), per_trial)]
    if len(groups) > 1 and len(groups[-1]) < per_trial:
        log.warning("GPUs %s left over: %d per trial", groups.pop(), per_trial)
    if workers > len(groups):
        log.warning("%d workers share %d GPU group(s)", workers, len(groups))
    return [",".join(groups[i % len(groups)]) for i in range(workers)]


def launch(setup: StudySetup, workers: int, gpus: Optional[list[str]]) -> int:
    """Run ``workers`` workers on this machine, then report. Returns the exit status; a
    database that stayed away past ``tune.storage_outage_s`` is one line and status 1, with
    the study's MLflow run ended FAILED (the study continues with the next ``ssod-tune``)."""
    study = open_study(setup)  # created here, so workers only join
    parent = parent_run(setup, reopen=True)
    try:
        return _launch(setup, study, parent, workers, gpus)
    except StorageUnavailable as error:
        log.error("%s; the study's run ends FAILED; run ssod-tune again to continue the study", error)
        end_parent_run(setup, parent, "FAILED", f"Stopped: {error}")
        return 1


def _launch(setup: StudySetup, study: optuna.Study, parent: str, workers: int, gpus: Optional[list[str]]) -> int:
    tune = setup.tune
    if workers > 1 or gpus is not None:
        gpus = visible_gpus(gpus)
    devices = assign_devices(workers, gpus, tune.processes_per_trial)
    stopped = threading.Event()
    if workers == 1:
        if devices[0] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
        run_worker(setup, 0, stop=stopped)
        status = 0
    else:
        # The shared burn-in, here with every core (workers share them out) and before any
        # worker starts, rather than in one worker while the others wait on its lock.
        with_shared_burn_in(setup)
        status = _supervise(setup, devices, stopped)
    now = usage(study)
    done = now.spent(tune.n_trials)
    summary = write_report(setup, study, parent, "FINISHED" if done else "KILLED" if stopped.is_set() else None)
    log.info("study %s: %s", tune.study_name, {k: v for k, v in summary.items() if k != "study"})
    if not done and status == 0 and not stopped.is_set():
        log.warning("budget not finished (%s); run ssod-tune again to continue", now)
    return 143 if stopped.is_set() else status


def _worker_command(setup: StudySetup, index: int) -> list[str]:
    return [sys.executable, "-m", "ssod.tune", "worker", "--index", str(index), *setup.cli_overrides]


def _worker_env(setup: StudySetup, device: Optional[str], workers: int) -> dict[str, str]:
    env = {**os.environ, RESOLVED_ENV: setup.storage_url, "PYTHONUNBUFFERED": "1"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if not device:
        # CPU workers split the cores instead of each starting one thread per core.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    return env


def _supervise(setup: StudySetup, devices: list[Optional[str]], stopped: threading.Event) -> int:
    """Start one process per device slot; restart crashed ones; pass SIGTERM/SIGINT on."""
    def start(index: int) -> subprocess.Popen:
        log.info("worker %d: CUDA_VISIBLE_DEVICES=%r", index, devices[index])
        return subprocess.Popen(_worker_command(setup, index), cwd=setup.project_dir, env=_worker_env(setup, devices[index], len(devices)))

    running = {index: start(index) for index in range(len(devices))}

    def forward(signum, frame) -> None:
        stopped.set()
        for process in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    restarts, status = 0, 0
    try:
        while running:
            for index, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[index]
                if code != 0 and not stopped.is_set() and restarts < setup.tune.max_worker_restarts:
                    restarts += 1
                    log.warning("worker %d exited with %d: restarting it (%d/%d)", index, code, restarts, setup.tune.max_worker_restarts)
                    running[index] = start(index)
                elif code != 0 and not stopped.is_set():
                    log.error("worker %d exited with %d", index, code)
                    status = 1
            time.sleep(0.5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status
