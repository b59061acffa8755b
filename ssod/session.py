"""The run's lifecycle: what a training holds from its start to its end, and lets go of.

``RunSession`` is the context manager ``ssod.training.run`` trains inside. Entering it sets up,
in this order: MLflow's request bounds (a server that went away costs seconds, not minutes),
the processes (``Accelerator``; only the main one prints), the run's folder (placed by the
first process, told to the others), its lock (a second training into it stops here), the
checkpoint to resume, the seed, the tracker, the stop-signal handlers and ``console.log``.
Leaving it ends all of that whatever happened: a Ctrl-C between steps or a prune still saves
a checkpoint, the loaders' workers stop, ``console.log`` goes to MLflow, the MLflow run ends
(FINISHED, KILLED or FAILED; spooled when the server does not take it), the lock is released
and the processes part (they wait for each other unless one failed alone).
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from omegaconf import DictConfig

from ssod.checkpoint import DirectoryLock
from ssod.data.sampling import shut_down_workers
from ssod.interrupts import Interrupts
from ssod.loop import RunResult
from ssod.masking import mask_secrets
from ssod.mlflow_client import bound_requests, check_reachable, default_tracking_uri
from ssod.outputs import HydraJob, place_run, run_name
from ssod.resume import find_resume
from ssod.spool import SPOOL_DIR
from ssod.step import Training, forget_accelerator
from ssod.tracking import Tracker

log = logging.getLogger(__name__)

# The run's log lines, in its output folder (and as an MLflow artifact of that name).
CONSOLE_LOG = "console.log"


class RunSession:
    """The processes, locked folder, MLflow run, signal handlers and console log of one
    training (module docstring). ``status`` is how the MLflow run ends (FAILED unless the body
    says otherwise); the body sets ``training`` and ``loaders`` once it has built them, so that
    leaving can save the one and stop the other."""

    def __init__(self, cfg: DictConfig) -> None:
        self.given = cfg
        self.project_dir = Path.cwd()
        self.uri = cfg.tracking.uri or default_tracking_uri(self.project_dir)
        self.job = HydraJob.current()
        self.status = "FAILED"
        self.training: Optional[Training] = None
        self.loaders = None
        self.final: Optional[RunResult] = None
        self.lock: Optional[DirectoryLock] = None
        self.console_log: Optional[logging.FileHandler] = None

    def __enter__(self) -> "RunSession":
        cfg = self.given
        # Every MLflow call of this process waits on a server that went away for seconds, not
        # for minutes of MLflow's retries: a stop request is acted on within the step.
        bound_requests(cfg.tracking.request_timeout_s, cfg.tracking.request_retries)
        if int(os.environ.get("RANK", "0")) == 0 and cfg.tracking.enabled:
            check_reachable(self.uri)  # seconds, not minutes of MLflow's retries
        self.accelerator = accelerator = _accelerator(cfg.train)
        _only_main_process_informs(accelerator)
        try:
            # The first process places the run (a new folder is named after the time, which
            # the others could read a second later) and tells the others where it is.
            self.output_dir = _agree_on_folder(accelerator, cfg, self.project_dir, self.job)
            self.cfg = _with_place_and_name(cfg, self.output_dir, self.project_dir, self.job)
            self.ckpt_dir = self.output_dir / "checkpoints"
            # The first process locks the folder before anything else: a second training into it stops here.
            self.lock = DirectoryLock(self.ckpt_dir) if accelerator.is_main_process else None
            with _held_warnings() as early:  # said before the run's console.log exists (a checkpoint set aside)
                self.resume_path, self.resumed = find_resume(self.cfg.train.resume, self.ckpt_dir)
            set_seed(self.cfg.train.seed)
            self.tracker = Tracker(self.uri, self.cfg.tracking.experiment,
                                   enabled=accelerator.is_main_process and self.cfg.tracking.enabled,
                                   spool_dir=self.output_dir / SPOOL_DIR, system_metrics=_system_metrics(self.cfg.tracking))
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            forget_accelerator(accelerator)  # a failed start leaves no process-wide state behind
            raise
        self.interrupts = Interrupts()
        # The run's log lines, kept beside its checkpoints (appended to by each resume) and in MLflow.
        if accelerator.is_main_process:
            self.console_log = _keep_console_log(self.output_dir / CONSOLE_LOG)
            for record in early:
                self.console_log.handle(record)  # into the file only: the console has shown them
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                self.status = "KILLED"
                if self.interrupts.safe_to_save and self.training is not None:
                    # A second Ctrl-C between steps (evaluating): the weights are whole, keep them.
                    self.training.save()
                    log.warning("stopped at once: checkpoint saved at step %d", self.training.state.step)
            elif error is not None and type(error).__name__ == "TrialPruned" and self.training is not None:
                self.status = "KILLED"
                self.training.save()
        finally:
            self._let_go()
        return False

    def _let_go(self) -> None:
        tracker, accelerator = self.tracker, self.accelerator
        self.interrupts.restore()
        if self.loaders is not None:  # now: a process training run after run keeps no run's workers
            shut_down_workers(self.loaders.labeled, self.loaders.unlabeled, self.loaders.val)
        if self.console_log is not None and tracker.run_id:  # a run that failed before its MLflow run exists has none
            self.console_log.flush()
            tracker.log_artifact(self.console_log.baseFilename)
        tracker.end(self.status)
        if tracker.spooled is not None:
            # The last line a user sees: the run is not fully in MLflow yet.
            if self.final is not None:
                self.final.tracking_incomplete = True
            log.error("tracking incomplete: the MLflow server did not take the run's last metric values, tags or "
                      "artifacts and its end (%s); they are kept in %s and sent by the next run in this folder or by "
                      "`ssod-sync %s`", self.status, tracker.spooled, self.output_dir)
        if self.console_log is not None:
            logging.getLogger().removeHandler(self.console_log)
            self.console_log.close()
        if self.lock is not None:
            self.lock.release()
        if self.status != "FAILED":
            # Not after an error: it may have struck this process alone, while the others
            # wait in a collective of the step for it; waiting for them too would hang the
            # job, where exiting lets the launcher (torchrun) stop them all.
            accelerator.wait_for_everyone()
        accelerator.free_memory()
        forget_accelerator(accelerator)
        if self.status != "KILLED":
            self.interrupts.pass_on()


class _MaskedFormatter(logging.Formatter):
    """Log lines with passwords in URIs masked, as on the console."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


@contextmanager
def _held_warnings() -> Iterator[list[logging.LogRecord]]:
    """The warnings logged inside the block, kept (as well as shown) for the run's console.log."""
    held: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = held.append
    logging.getLogger().addHandler(handler)
    try:
        yield held
    finally:
        logging.getLogger().removeHandler(handler)


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _only_main_process_informs(accelerator: Accelerator) -> None:
    """The other processes of a distributed run print only warnings and errors, each line
    marked with its rank: the console shows a run once, not once per process."""
    if accelerator.is_main_process:
        return
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    for handler in root.handlers:
        if not any(isinstance(f, _RankPrefix) for f in handler.filters):
            handler.addFilter(_RankPrefix(accelerator.process_index))


def _keep_console_log(path: Path) -> logging.FileHandler:
    """Copy every log line the run prints (every logger, from INFO) into ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_MaskedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)  # the levels are the console's (Hydra's job logging: INFO)
    return handler


def _agree_on_folder(accelerator: Accelerator, cfg: DictConfig, project_dir: Path, job) -> Path:
    """The run's folder, placed by the first process and sent to the others; its error (a
    missing checkpoint to resume) is raised by every process, none waits for a folder."""
    placed = None
    if accelerator.is_main_process:
        try:
            placed = place_run(cfg, project_dir, job)
        except Exception as error:  # noqa: BLE001 - sent, then raised here too
            placed = error
    placed = broadcast_object_list([placed])[0]
    if isinstance(placed, Exception):
        raise placed
    return placed


def _with_place_and_name(cfg: DictConfig, output_dir: Path, project_dir: Path, job) -> DictConfig:
    """A copy of ``cfg`` that says where the run is (relative to the project when inside
    it) and its name: what the params, ``config.yaml`` and the checkpoints carry."""
    placed = copy.deepcopy(cfg)
    try:
        where = output_dir.relative_to(project_dir)
    except ValueError:
        where = output_dir
    placed.train.output_dir = str(where)
    placed.train.run_name = run_name(cfg, job)
    return placed


def _accelerator(train) -> Accelerator:
    # Several processes (torchrun) on a machine without CUDA: accelerate sets up gloo data
    # parallelism only when told cpu=True; otherwise every process trains alone as rank 0,
    # each with its own MLflow run.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=mixed_precision(train.mixed_precision),
        cpu=train.cpu or multi_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.find_unused_parameters)],
    )


def mixed_precision(configured: Optional[str]) -> str:
    """The precision to train in: ``train.mixed_precision`` when set (with a warning when the
    launcher, ``accelerate launch`` or ``accelerate config``, said another), else the launcher's."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured is None:
        return launcher or "no"
    if launcher is not None and launcher != configured:
        log.warning("train.mixed_precision=%s overrides the launcher's mixed precision %s "
                    "(leave train.mixed_precision=null to use the launcher's)", configured, launcher)
    return configured


def _system_metrics(tracking) -> bool:
    """``tracking.system_metrics``, or MLflow's variable when null (on when that is unset too)."""
    if tracking.system_metrics is not None:
        return bool(tracking.system_metrics)
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("true", "1")
