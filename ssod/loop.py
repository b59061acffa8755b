"""The training loop: step, log, evaluate, checkpoint, from ``training.state.step`` on."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ssod.checkpoint import mark_best
from ssod.data.pipeline import DataBundle
from ssod.inference import EvaluationInterrupted, evaluate
from ssod.interrupts import Interrupts
from ssod.meters import Meters, log_pictures
from ssod.methods import Method
from ssod.models.teacher import ema_momentum
from ssod.report import VAL_DETECTIONS
from ssod.run_state import RunState, log_bad_files, stop_if_too_many_bad
from ssod.step import LoaderWorkerDied, Training, to_device, train_step
from ssod.tracking import Tracker

log = logging.getLogger(__name__)

EvalCallback = Callable[[int, dict[str, float]], None]


class RunResult(dict):
    """Final metrics by name; ``status`` says how the run ended (FINISHED or KILLED);
    ``tracking_incomplete``: MLflow did not take all of it (see ``Tracker.end``)."""

    status = "FINISHED"
    tracking_incomplete = False
    stop_signal: Optional[int] = None  # what stopped a KILLED run (SIGTERM or SIGINT)


# ssod-train's exit status when training finished but MLflow did not take all of the run.
TRACKING_INCOMPLETE_STATUS = 3


@dataclass
class Loaders:
    """Endless training batches (``unlabeled`` is None when supervised) and the validation loader."""

    labeled: Iterator
    unlabeled: Optional[Iterator]
    val: DataLoader


def train_loop(cfg: DictConfig, method: Method, data: DataBundle, training: Training, loaders: Loaders,
               tracker: Tracker, interrupts: Interrupts, on_eval: Optional[EvalCallback]) -> RunResult:
    """Iterate from ``training.state.step`` to ``train.iterations``: step, log, evaluate, checkpoint."""
    train, state = cfg.train, training.state
    meters = Meters(method.thresholds.cls, data.category_map.names)
    clock = IntervalClock(state.step)
    progress = _progress(training.accelerator, train, state.step)
    bad_files_logged = 0  # how many of state.bad_files the bad_images.txt artifact lists
    final = RunResult(data.counts())  # what the run read, in final_metrics.json too
    if state.step >= train.iterations:
        _evaluate_finished_run(training, loaders, tracker, final, on_eval)

    for step in range(state.step, train.iterations):
        labeled, unlabeled = _next_batch_or_stop(loaders, method, step, training)
        result, total, flags = train_step(training, labeled, unlabeled, method, method.loss_weights(step), train,
                                          lambda: interrupts.requested)  # asked after the forward pass
        stop_if_too_many_bad(state, data, cfg.data.max_bad_image_fraction, tracker, flags.bad_files)
        state.step = step + 1
        meters.update(result, total, unlabeled, flags.nonfinite)
        if progress is not None:
            progress.update(1)
        # A stop logs the interval it cuts short: the resumed run starts a new one there.
        if _due(state.step, train.log_every, train.iterations) or flags.stop:
            final.update(_log_interval(meters, clock, training, method, tracker, progress))
            bad_files_logged = log_bad_files(tracker, state.bad_files, bad_files_logged)
        with clock.paused():  # evaluations and checkpoints are not training time (train/sec_per_iter)
            best = False
            if _due(state.step, train.eval_every, train.iterations) and not flags.stop:
                flags.stop = _evaluate(training, loaders, meters, data, train, tracker, interrupts, final, on_eval)
                best = not flags.stop and _is_new_best(training, final, train.best_metric)
            if _due(state.step, train.ckpt_every, train.iterations) or flags.stop or best:
                training.save()
            if best and training.accelerator.is_main_process:
                mark_best(training.ckpt_dir, state.step, train.best_metric, state.best_value)
                tracker.set_tags({"ssod.best_step": str(state.step)})
        if flags.stop:
            log.warning("stop requested: checkpoint saved at step %d", state.step)
            final.status, final.stop_signal = "KILLED", interrupts.signum
            break
    if progress is not None:
        progress.close()
    return final


def _is_new_best(training: Training, metrics: dict[str, float], name: str) -> bool:
    """Whether the evaluation just logged (in ``metrics``, on the main process) beat the best
    value of ``name`` so far; all processes learn the answer and note it in the run state,
    which the checkpoint of this step then holds. A NaN (nothing to score) never wins."""
    state = training.state
    if not name:
        return False
    value = metrics.get(name) if training.accelerator.is_main_process else None
    if value is not None and not (math.isfinite(value) and (state.best_value is None or value > state.best_value)):
        value = None
    if training.accelerator.num_processes > 1:
        value = broadcast_object_list([value])[0]
    if value is None:
        return False
    state.best_value, state.best_step = float(value), state.step
    return True


def _due(step: int, every: int, last: int) -> bool:
    """Whether ``step`` (1-based) ends an interval of ``every`` steps (the last step always does)."""
    return step % every == 0 or step == last


class IntervalClock:
    """Training seconds per step over a log interval, the paused parts (evaluations, checkpoints) left out."""

    def __init__(self, step: int) -> None:
        self.start, self.step = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float:
        """The interval's mean up to ``step``; the next interval starts now."""
        seconds = (time.perf_counter() - self.start) / max(step - self.step, 1)
        self.start, self.step = time.perf_counter(), step
        return seconds

    @contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused


def _next_batch_or_stop(loaders: Loaders, method: Method, step: int, training: Training) -> tuple[list, list]:
    """``_next_batch``; when a loader worker has died (``RuntimeError: DataLoader worker ...``,
    or the loader's connection to it reset), the weights are whole (between steps):
    checkpoint, then ``LoaderWorkerDied``."""
    try:
        batch = _next_batch(loaders, method, step, training.state, training.accelerator.device)
    except (RuntimeError, ConnectionError, EOFError) as error:
        # torch names a dead worker in a RuntimeError; reading its half-written batch from the
        # queue can fail first, as a reset or closed connection.
        if isinstance(error, RuntimeError) and "DataLoader worker" not in str(error):
            raise
        training.save()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoaderWorkerDied(
            f"a data loader worker died ({reason}); checkpoint saved at step {step}: "
            "continue with train.resume=auto (with fewer data.num_workers if the machine ran out of memory)") from error
    _worker_deaths_at_fetch()
    return batch


def _worker_deaths_at_fetch() -> None:
    """torch's loaders install a SIGCHLD handler that raises a dead worker's error wherever the
    main process is, in the middle of an optimizer step too. Without it the loader finds the
    dead worker at the next fetch (within 5 s), between steps, where a checkpoint is exact."""
    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", "") == "torch.utils.data._utils.signal_handling" and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _next_batch(loaders: Loaders, method: Method, step: int, state: RunState, device) -> tuple[list, list]:
    """This step's labeled batch and, after the burn-in (``method.unsup_start``), its unlabeled
    batch, on the device; the unreadable images met are noted in ``state``."""
    labeled, labeled_meta = next(loaders.labeled)
    semi = loaders.unlabeled is not None and method.semi_supervised_at(step)
    unlabeled, unlabeled_meta = next(loaders.unlabeled) if semi else ([], [])
    state.note_bad_files(labeled_meta + unlabeled_meta)
    return to_device(labeled, device), to_device(unlabeled, device)


def _log_interval(meters: Meters, clock: IntervalClock, training: Training, method: Method, tracker: Tracker,
                  progress) -> dict[str, float]:
    """The interval's means, schedule and fault counters, logged at the step just taken."""
    state = training.state
    scalars = meters.compute()
    scalars.update(_schedule_scalars(training.optimizer, state, method, clock.seconds_per_step(state.step)))
    tracker.log_metrics(scalars, state.step)
    if progress is not None:  # the interval's mean loss: no extra wait for the device per step
        progress.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.3f}", refresh=False)
    return scalars


def _evaluate(training: Training, loaders: Loaders, meters: Meters, data: DataBundle, train, tracker: Tracker,
              interrupts: Interrupts, final: RunResult, on_eval: Optional[EvalCallback]) -> bool:
    """Evaluate teacher and student, log them and the pseudo-label pictures; returns whether a
    stop request cut the evaluation short (it is then not logged)."""
    state, started = training.state, time.perf_counter()
    interrupts.evaluating = interrupts.safe_to_save = True
    # Not reset in a ``finally``: a second Ctrl-C (KeyboardInterrupt) leaves them set for
    # ``run``, which may then still save.
    try:
        # The last evaluation keeps its detections: the run's final report is drawn from them.
        final_detections = training.ckpt_dir.parent / VAL_DETECTIONS if state.step == train.iterations else None
        metrics = evaluate_both(training, loaders.val, interrupts, progress=train.progress, save_dir=final_detections)
    except EvaluationInterrupted:
        interrupts.evaluating = interrupts.safe_to_save = False
        log.warning("the evaluation at step %d was cut short by the stop request: not logged", state.step)
        return True
    interrupts.evaluating = interrupts.safe_to_save = False
    if training.accelerator.is_main_process:
        metrics["val/seconds"] = time.perf_counter() - started
        tracker.log_metrics(metrics, state.step)
        log_pictures(tracker, meters.recent, data.category_map.names, state.step, train.num_vis_images)
        final.update(metrics)
        if on_eval is not None:
            on_eval(state.step, metrics)
    return False


def _evaluate_finished_run(training: Training, loaders: Loaders, tracker: Tracker, final: RunResult,
                           on_eval: Optional[EvalCallback]) -> None:
    """Resumed from the final checkpoint (a retried trial, a requeued job): nothing to train,
    but the run (what it lacks of it), final_metrics.json and ``on_eval`` (a tuning trial
    completes on it) still get the final evaluation. The training scalars of
    final_metrics.json are those the run already has."""
    metrics = evaluate_both(training, loaders.val)
    if training.accelerator.is_main_process:
        tracker.log_metrics(metrics, training.state.step)
        # MLflow's system monitor samples into the same run (system/...), and final/... repeat the
        # end's APs (logged again below): not training results.
        final.update({key: value for key, value in tracker.previous_metrics.items()
                      if not key.startswith(("system/", "final/"))})
        final.update(metrics)
        if on_eval is not None:
            on_eval(training.state.step, metrics)


def _schedule_scalars(optimizer, state: RunState, method: Method, seconds_per_iter: float) -> dict[str, float]:
    """Per-interval scalars of the schedule and of the faults met so far."""
    last_ema_step = max(state.ema_steps - 1, 0)
    return {
        "train/sec_per_iter": seconds_per_iter,
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/nonfinite_steps": state.nonfinite_steps,
        "train/bad_images": len(state.bad_files),
        "train/ema_momentum": ema_momentum(last_ema_step, method.ema.momentum),
        "train/polish_ema_momentum": ema_momentum(last_ema_step, method.ema.polish_momentum, method.ema.polish_warmup),
        "train/unsup_weight": method.schedule.unsup_weight_at(max(state.step - 1, 0)),
    }


def evaluate_both(training: Training, val_loader, interrupts: Optional[Interrupts] = None,
                   prefix: str = "val", progress: bool = False, save_dir: Optional[Path] = None) -> dict[str, float]:
    """``<prefix>/teacher/bbox_*`` and ``<prefix>/student/bbox_*`` (main process; empty elsewhere).
    ``save_dir``: the detections also go to ``<save_dir>/{teacher,student}.json.gz``.

    With ``interrupts`` and one process, a stop request cuts the evaluation short
    (``EvaluationInterrupted``); several processes finish it together (one alone leaving
    would hang the others in the gather).
    """
    accelerator = training.accelerator
    metrics: dict[str, float] = {}
    can_stop = interrupts is not None and accelerator.num_processes == 1
    should_stop = (lambda: interrupts.requested) if can_stop else (lambda: False)
    for name, detector in (("teacher", training.teacher.detector), ("student", accelerator.unwrap_model(training.student).detector)):
        save_to = save_dir / f"{name}.json.gz" if save_dir is not None else None
        result = evaluate(detector, val_loader, accelerator, should_stop, f"{prefix}: {name}" if progress else None,
                          save_to)
        if result is not None:
            metrics.update({f"{prefix}/{name}/bbox_{key}": value for key, value in result.items()})
    return metrics


def _progress(accelerator, train, start: int):
    if not (train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=train.iterations, initial=start, desc="train", dynamic_ncols=True)
