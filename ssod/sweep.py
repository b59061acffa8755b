"""A Hydra multirun's parent MLflow run: ``ssod-train -m ...`` nests its jobs under one run.

Hydra calls ``SweepParent`` (registered in ``conf/config.yaml`` under ``hydra.callbacks``) in
the process that starts the sweep. It finds or creates the sweep's parent run, tagged
``ssod.sweep`` with the sweep folder, and writes its id to ``<sweep dir>/mlflow_parent_run``;
each job (in this process, or in another one a launcher starts) reads that file and nests
its run under it (``training.run``: ``tracking.parent_run_id`` when that is not set). The
same sweep folder again (``hydra.sweep.dir=<folder> train.resume=auto``) reopens the same
parent. At the sweep's end the parent's description lists its jobs with their APs and the
run ends FINISHED; a sweep that stops on a failed job or a signal ends it FAILED or KILLED.
"""

from __future__ import annotations

import atexit
import logging
import math
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ssod.io import write_text_atomic
from ssod.mlflow_client import bound_requests, default_tracking_uri, tracking_errors
from ssod.tracking import Tracker

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run"


def sweep_parent_run_id(sweep_dir: Path) -> str:
    """The parent run a job of the sweep in ``sweep_dir`` nests under ("" without one)."""
    try:
        return (Path(sweep_dir) / PARENT_FILE).read_text().strip()
    except OSError:
        return ""


class SweepParent(Callback):
    """Hydra callback: the multirun's parent run, opened at its start and closed at its end."""

    def __init__(self) -> None:
        self.tracker: Optional[Tracker] = None
        self.sweep_dir: Optional[Path] = None
        self.overrides: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        self.sweep_dir = Path(config.hydra.sweep.dir).absolute()
        bound_requests(config.tracking.request_timeout_s, config.tracking.request_retries)
        tracker = Tracker(config.tracking.uri or default_tracking_uri(Path.cwd()), config.tracking.experiment)
        self.overrides = overrides = [str(o) for o in config.hydra.overrides.task]
        tags = {"ssod.sweep": str(self.sweep_dir), "ssod.role": "sweep"}
        try:
            found = sweep_parent_run_id(self.sweep_dir) or next(iter(tracker.find_runs(tags)), "")
            tracker.start(f"sweep {self.sweep_dir.name}", tags, run_id=found)
            if not found:
                tracker.log_params({"sweep.overrides": " ".join(overrides), "sweep.dir": str(self.sweep_dir)})
            tracker.describe(_description(self.sweep_dir, overrides, []), only_if_ours=True)
        except tracking_errors() as error:
            log.warning("the sweep's parent MLflow run could not be opened (%s): its jobs' runs are not nested", error)
            return
        write_text_atomic(tracker.run_id + "\n", self.sweep_dir / PARENT_FILE)
        log.info("sweep %s: parent MLflow run %s", self.sweep_dir, tracker.run_id)
        self.tracker = tracker
        # A failed job ends the sweep with an exception, Ctrl-C or SIGTERM with an exit: then
        # on_multirun_end is never called, and the parent must not stay RUNNING.
        atexit.register(self._end, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        try:
            jobs = _jobs(tracker)
            tracker.describe(_description(self.sweep_dir, self.overrides, jobs), only_if_ours=True)
            finite = [ap for _, _, ap in jobs if ap is not None and math.isfinite(ap)]
            if finite:
                tracker.log_metrics({"sweep/best_val_teacher_AP": max(finite), "sweep/jobs": len(jobs)}, 0)
        except tracking_errors() as error:
            log.warning("the sweep's parent MLflow run %s: its summary could not be written (%s)", tracker.run_id, error)
        tracker.end(status)


def _jobs(tracker: Tracker) -> list[tuple[str, str, Optional[float]]]:
    """The parent's jobs: (run name, status, final validation teacher AP), oldest first."""
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    runs = tracker.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{tracker.run_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=1000)
    return [(r.info.run_name, r.info.status, r.data.metrics.get("val/teacher/bbox_AP")) for r in runs]


def _description(sweep_dir: Path, overrides: list[str], jobs: list[tuple[str, str, Optional[float]]]) -> str:
    lines = [f"**Hydra multirun** in `{sweep_dir}`" + (f": `{' '.join(overrides)}`" if overrides else "") + "."]
    if jobs:
        lines += ["", "| job run | status | val teacher AP (%) |", "| --- | --- | --- |"]
        lines += [f"| {name} | {status} | {'-' if ap is None else f'{100 * ap:.1f}'} |" for name, status, ap in jobs]
    return "\n".join(lines)
