"""The one door to MLflow.

Only the main process talks to MLflow: every other process gets a disabled ``Tracker``
whose methods do nothing, so no rank can create a stray run. Runs are driven through
``MlflowClient`` with an explicit run id (never the global active run), so a crash
cannot leave a run FINISHED by accident: ``end`` sets the status we mean.

Default store: an absolute ``sqlite:///<project dir>/mlflow.db`` fixed at start, so
Hydra's run directory or a ``chdir`` can never move it. ``mlflow ui
--backend-store-uri sqlite:///mlflow.db`` from the project directory shows the runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from ssod.masking import mask_secrets
from ssod.mlflow_client import (
    artifact_location_for,
    is_permanent,
    process_tracking_uri,
    quiet_mlflow_links,
    tracking_errors,
)
from ssod.mlflow_view import experiment_tags, run_url, runs_url, ui_base
from ssod.spool import replay_spool, unsent_folder, write_spool

log = logging.getLogger(__name__)

_PARAM_LIMIT = 6000
# MLflow keeps run names up to this length.
_RUN_NAME_LIMIT = 250
# Metric values held for the next try while the tracking server is unreachable.
_PENDING_LIMIT = 100_000
# After a failure the server is left alone this long: MLflow's own retries make each call
# to a dead server block for minutes, and training (and the other ranks) would wait on it.
_PAUSE_S = 300.0
# How long the end of a run waits for MLflow's system metrics monitor to stop.
_MONITOR_STOP_S = 5
# The step of the newest checkpoint a training run has saved (see ``Tracker.start``).
CHECKPOINT_STEP_TAG = "ssod.checkpoint_step"


def provenance_tags() -> dict[str, str]:
    """What made a run: MLflow's own context tags (user, entry point), ssod's version and
    commit (``mlflow.source.git.commit``, shown by ``mlflow ui``; ``ssod.git_dirty`` when
    the checkout has changes), and the torch version. Best effort: each is left out if it
    cannot be found (an installed wheel has no commit)."""
    from importlib import metadata

    import torch

    tags: dict[str, str] = {"ssod.torch": torch.__version__}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags.update(resolve_tags())
    except Exception as error:  # noqa: BLE001 - provenance must never stop a run
        log.debug("MLflow context tags unavailable: %s", error)
    try:
        tags["ssod.version"] = metadata.version("ssod")
    except metadata.PackageNotFoundError:
        pass
    source = Path(__file__).resolve().parents[1]
    if (source / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            changes = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            tags["mlflow.source.git.commit"] = commit
            if changes:
                tags["ssod.git_dirty"] = "true"
        except (OSError, subprocess.SubprocessError) as error:
            log.debug("no git commit for %s: %s", source, error)
    return tags


def machine_description() -> str:
    """Where a run trains: host, CPU model and cores, and whether the CPU has AVX-512. CPU
    training is bit-reproducible on one machine, not across CPUs that round differently, so
    a comparison of runs needs to know which ran where."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    avx512 = ", AVX-512" if " avx512f" in info else ""
    return f"{platform.node()}: {model}, {os.cpu_count()} cores{avx512}"


def strict_json(data: Any, **options) -> str:
    """JSON that strict readers accept: a NaN or infinite number (an undefined metric) is null."""

    def clean(value):
        if hasattr(value, "tolist") and callable(value.tolist):  # numpy and torch values, of any shape
            value = value.tolist()
        if isinstance(value, Mapping):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False, **options)


class Tracker:
    """A thin wrapper around one MLflow run; a no-op when ``enabled`` is False.

    ``start``, ``log_params`` and ``log_dataset`` fail loudly (a run that cannot be tracked
    should not start). Once training runs, a tracking error (a server outage, a locked
    database) is a warning, never the end of the run: metric values are held and sent
    with the next call; a tag, text, image or file artifact that failed is kept for the
    end (texts and images as files in the spool folder). After such a failure the server
    is not called for ``_PAUSE_S`` seconds (values are held, the rest kept); ``end`` tries
    once more, and spools what still did not get through. How long one call may wait is
    bounded by ``bound_requests``. Values the server refuses (an invalid key, a deleted
    run) are dropped, not held. ``failures`` counts what did not get through.
    """

    def __init__(self, uri: str, experiment: str, enabled: bool = True, spool_dir: Optional[Path] = None,
                 system_metrics: bool = False) -> None:
        self.enabled = enabled
        # MLflow's own monitor (CPU, memory, disk, network, GPU) logs ``system/...`` metrics
        # into the run while it is open: the run page's "System metrics" tab.
        self.system_metrics = system_metrics
        self._monitor = None
        # What ``end`` could not send (values, the run's end) is written here, and sent by
        # the next start in this folder or by ``ssod-sync`` (see ``replay_spool``).
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.spooled: Optional[Path] = None  # the file ``end`` wrote, if any
        self.uri = uri
        self.experiment = experiment
        self.run_id: Optional[str] = None
        self.experiment_id = ""  # known once a run started (see ``_experiment_id``)
        # Metric name -> the last step a resumed run already has (those steps are skipped).
        self.logged_steps: dict[str, int] = {}
        # Metric name -> the latest value a resumed run already has.
        self.previous_metrics: dict[str, float] = {}
        self.branched_from = ""  # see ``start``
        self.previous_tags: dict[str, str] = {}  # the tags of a reopened run, as it was
        self._checkpoint_step: Optional[int] = None  # see ``note_checkpoint``
        self.client = None
        self.failures = 0
        self._pending: list = []
        # Tags (key -> value, masked) and artifacts ((local file, artifact folder or None))
        # not sent while the server was down: tried again by ``end``, spooled if still unsent.
        self._unsent_tags: dict[str, str] = {}
        self._unsent_files: list[tuple[str, Optional[str]]] = []
        self._paused_until = 0.0
        if enabled:
            from mlflow.tracking import MlflowClient

            quiet_mlflow_links()
            self.client = MlflowClient(tracking_uri=uri)

    def _experiment_id(self) -> str:
        """The experiment's id, created when missing, with ``experiment_tags`` (the model
        training kind, the runs table's shared view): an experiment made by an older ssod
        gets them here."""
        if self.experiment_id:
            return self.experiment_id
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                found = self.client.get_experiment(self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location_for(self.uri), tags=experiment_tags()))
            except MlflowException:
                # Another worker created it between our lookup and create.
                found = self.client.get_experiment_by_name(self.experiment)
        self._tag_experiment(found)
        return self.experiment_id

    def _tag_experiment(self, experiment) -> None:
        """Make ``experiment`` this tracker's, with ``experiment_tags`` set where they differ."""
        for key, value in experiment_tags().items():
            if experiment.tags.get(key) != value:
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        self.experiment_id = experiment.experiment_id

    def links(self) -> str:
        """Where to see this run in MLflow's UI, for the console: the experiment's runs
        table and the run's page, both in the model-training view (see ``ssod.mlflow_view``);
        for a store without a server, the ``mlflow ui`` command that serves them."""
        if not (self.enabled and self.run_id and self.experiment_id):
            return ""
        base = mask_secrets(ui_base(self.uri))
        where = (f"runs {runs_url(base, self.experiment_id)} ; this run {run_url(base, self.experiment_id, self.run_id)}")
        if base != mask_secrets(self.uri.rstrip("/")):
            where = f"`mlflow ui --backend-store-uri {mask_secrets(self.uri)}`, then {where}"
        return where

    def start(self, run_name: str, tags: Mapping[str, str] = (), parent_run_id: str = "", run_id: str = "",
              resume_step: Optional[int] = None, saved_step: int = 0, new_run_tags: Mapping[str, str] = (),
              distinct: bool = False) -> str:
        """Start a new run, or reopen ``run_id`` (resume) and skip steps it already has.

        ``tags`` are set either way, ``new_run_tags`` (provenance) only on a new run. With
        ``distinct``, a new run whose name the experiment already has is numbered
        (``<name> #2``, ``#3``...), so that the runs table tells them apart.

        A resume at ``resume_step`` from before a checkpoint the run already saved (its tag
        ``ssod.checkpoint_step``, or ``saved_step``: the newest checkpoint on disk) goes
        back: reopened, the run would hold two histories, and the skipped steps would keep
        the abandoned one's values. It starts a new run instead, tagged
        ``ssod.branched_from_run`` and ``ssod.branched_from_step``; ``branched_from`` is
        then the old run's id.
        """
        if not self.enabled:
            return ""
        if self.spool_dir is not None and self.spool_dir.is_dir():
            # What an earlier run in this folder could not send (the server was down at its end).
            replay_spool(self.spool_dir, self.uri)
        all_tags = {k: mask_secrets(str(v)) for k, v in dict(tags).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        reopened = self.client.get_run(run_id) if run_id else None
        if reopened is not None and resume_step is not None:
            tagged = reopened.data.tags.get(CHECKPOINT_STEP_TAG)
            passed = max(int(tagged) if tagged is not None else 0, saved_step)
            if passed > resume_step:
                log.warning("MLflow run %s already went on to a checkpoint at step %d: going back to step %d "
                            "starts a new run", run_id, passed, resume_step)
                all_tags.update({"ssod.branched_from_run": run_id, "ssod.branched_from_step": str(resume_step)})
                if tagged is None or int(tagged) < passed:
                    # What the files said, for the next resume (the later ones are set aside now).
                    self.client.set_tag(run_id, CHECKPOINT_STEP_TAG, str(passed))
                self.branched_from, run_id = run_id, ""
                run_name = f"{run_name} (from step {resume_step})"
        if run_id:
            self.run_id = run_id
            self._tag_experiment(self.client.get_experiment(reopened.info.experiment_id))
            self.client.update_run(run_id, status="RUNNING")
            self.logged_steps, self.previous_metrics = self._metrics_so_far(reopened)
            self.previous_tags = dict(reopened.data.tags)
            for key, value in all_tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            all_tags = {**{k: mask_secrets(str(v)) for k, v in dict(new_run_tags).items()}, **all_tags}
            experiment_id = self._experiment_id()
            if distinct:
                run_name = self._distinct_name(experiment_id, run_name)
            run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            if self.branched_from:  # the old run says where it went on
                try:
                    branches = self.client.get_run(self.branched_from).data.tags.get("ssod.branches", "")
                    self.client.set_tag(self.branched_from, "ssod.branches", ",".join(filter(None, [branches, self.run_id])))
                except tracking_errors() as error:
                    self._warn(f"tag ssod.branches of run {self.branched_from}", error, "skipped")
        if self.system_metrics:
            self._start_monitor(resumed=reopened is not None and run_id == self.run_id)
        return self.run_id

    def _distinct_name(self, experiment_id: str, name: str) -> str:
        """``name``, or ``name #<n>`` with the first number no run of the experiment has."""
        if "'" in name:  # not expressible in the filter; rare (names come from overrides)
            return name
        # LIKE's wildcards and a prefix that a numbered, cut name keeps: a superset, checked exactly below.
        pattern = name[: _RUN_NAME_LIMIT - 10].replace("%", "_")
        taken = {run.info.run_name for run in self.client.search_runs(
            [experiment_id], filter_string=f"attributes.run_name LIKE '{pattern}%'", max_results=5000)}
        if name not in taken:
            return name

        def numbered(number: int) -> str:  # cut to MLflow's limit, the number kept
            suffix = f" #{number}"
            return name[: _RUN_NAME_LIMIT - len(suffix)] + suffix

        number = 2
        while numbered(number) in taken:
            number += 1
        return numbered(number)

    def _start_monitor(self, resumed: bool) -> None:
        """MLflow's system metrics monitor on this run (a reopened run continues its steps)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start and stop lines (four per run) are not news on the console; warnings still are.
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
        try:
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as error:  # noqa: BLE001 - a monitor must never stop a training
            self._monitor = None
            log.warning("MLflow system metrics are not logged: %s", mask_secrets(str(error)))

    def _stop_monitor(self) -> None:
        """Stop the monitor, waiting for it at most ``_MONITOR_STOP_S``: its thread may be deep
        in MLflow's retries against a server that went away, and a run's end (the spool, a
        scheduler's grace period) must not wait minutes for it. Its last samples are sent only
        when it stopped in time and the server was answering."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        monitor._shutdown_event.set()  # what MLflow's own finish() does first, before its unbounded join
        thread = monitor._process
        if thread is not None:
            thread.join(_MONITOR_STOP_S)
        if (thread is not None and thread.is_alive()) or self._paused():
            log.warning("MLflow system metrics: the monitor did not stop within %d s (the server is not answering); "
                        "its last samples are dropped", _MONITOR_STOP_S)
            return
        try:
            monitor.mlflow_logger.flush()
        except Exception as error:  # noqa: BLE001
            log.warning("MLflow system metrics: the last samples were not sent: %s", mask_secrets(str(error)))

    def find_runs(self, tags: Mapping[str, str]) -> list[str]:
        """Ids of this experiment's runs carrying every tag in ``tags``, oldest first.

        Tag values must not contain quotes (they go into an MLflow filter string).
        """
        if not self.enabled:
            return []
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs(
            [self._experiment_id()], filter_string=query, order_by=["attributes.start_time ASC"], max_results=5000
        )
        return [run.info.run_id for run in runs]

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` of metric ``name`` as the store has it ([] when it has none, or
        does not answer: a picture drawn from it is then skipped, never the run)."""
        if not (self.enabled and self.run_id) or self._paused():
            return []
        try:
            return [(metric.step, metric.value) for metric in self.client.get_metric_history(self.run_id, name)]
        except tracking_errors() as error:
            self._warn(f"reading the history of {name}", error, "skipped")
            return []

    def _metrics_so_far(self, run) -> tuple[dict[str, int], dict[str, float]]:
        """The largest step of each metric already in ``run`` (this one, as reopened), and
        its latest value.

        Steps per metric, not overall: a run killed during an evaluation has the interval's
        training scalars at that step but not the evaluation's, which the resumed run logs.
        """
        latest = dict(run.data.metrics)
        steps = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in latest}
        return steps, latest

    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params (values masked, long values cut) the run does not have yet.

        MLflow never changes a logged param: returns those given with another value than the
        run's (a resume with another config), as ``{key: (logged, given)}``.
        """
        if not self.enabled:
            return {}
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        given = {key: mask_secrets(str(value))[:_PARAM_LIMIT] for key, value in params.items()}
        batch = [Param(key, value) for key, value in given.items() if key not in existing]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start : start + 100])
        return {key: (existing[key], value) for key, value in given.items() if key in existing and existing[key] != value}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars as floats at ``step``; a metric's steps a resumed run already has are skipped."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        timestamp = _now_ms()
        batch = []
        for key, value in metrics.items():
            if step <= self.logged_steps.get(key, -1):
                continue
            number = float(value.item() if hasattr(value, "item") else value)
            if math.isnan(number):
                continue  # MLflow stores NaN, but charts and comparisons choke on it
            batch.append(Metric(key, number, timestamp, step))
        self._pending = (self._pending + batch)[-_PENDING_LIMIT:]
        self._flush(f"logging metrics at step {step}")

    def _flush(self, what: str) -> None:
        """Send the held metric values, unless the server is left alone after a failure."""
        if self._paused() or not self._pending:
            return
        self._pending, error = self._send(self._pending)
        if self._pending:
            self._pause()
            self._warn(what, error, f"{len(self._pending)} values held; the server is left alone for {_PAUSE_S:.0f} s")

    def _send(self, metrics: list) -> tuple[list, Optional[BaseException]]:
        """Send ``metrics`` in chunks; returns those not sent when the server stopped answering
        and its error. A chunk the server refuses is sent value by value, so only the refused
        values are lost (held, they would fail every later batch)."""
        for start in range(0, len(metrics), 500):
            chunk = metrics[start : start + 500]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
                continue
            except tracking_errors() as error:
                if not is_permanent(error):
                    return metrics[start:], error
            done, error = self._send_each(chunk)
            if error is not None:
                return metrics[start + done :], error
        return [], None

    def _send_each(self, chunk: list) -> tuple[int, Optional[BaseException]]:
        """Send the values one by one, dropping those refused; returns how many were dealt
        with before the server stopped answering, and its error."""
        for index, metric in enumerate(chunk):
            try:
                self.client.log_batch(self.run_id, metrics=[metric])
            except tracking_errors() as error:
                if not is_permanent(error):
                    return index, error
                self._warn(f"logging {metric.key} at step {metric.step}", error, "that value dropped")
        return len(chunk), None

    def note_checkpoint(self, step: int) -> None:
        """Tag the run with the step of the checkpoint just saved (``end`` tags it again:
        a tag skipped while MLflow was unreachable must not stay behind)."""
        self._checkpoint_step = step
        self.set_tags({CHECKPOINT_STEP_TAG: step})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for key, value in tags.items():
                masked = mask_secrets(str(value))
                if self._best_effort(f"tag {key}", self.client.set_tag, self.run_id, key, masked) is False:
                    self._unsent_tags[key] = masked
                else:  # sent (or refused): an older unsent value must not overwrite it later
                    self._unsent_tags.pop(key, None)

    def delete_tag(self, key: str) -> None:
        """Remove ``key`` from the run's tags if it has it (best effort, as ``set_tags``)."""
        if self.enabled:
            self._best_effort(f"removing tag {key}", self._delete_tag_if_set, key)

    def _delete_tag_if_set(self, key: str) -> None:
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            masked = mask_secrets(text)
            if self._best_effort(artifact_file, self.client.log_text, self.run_id, masked, artifact_file) is False:
                local = self._unsent_copy(artifact_file)
                if local is not None:
                    local.write_text(masked, encoding="utf-8")
                    self._keep_unsent(local, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self.log_text(strict_json(data, sort_keys=True), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """The file ``path`` under the run's ``artifact_path``. Not sent, it is sent by ``end``
        or from the spool as the file is then (console.log with its last lines)."""
        if self.enabled:
            if self._best_effort(str(path), self.client.log_artifact, self.run_id, str(path), artifact_path) is False:
                entry = (str(Path(path).resolve()), artifact_path)
                if entry not in self._unsent_files:
                    self._unsent_files.append(entry)

    def log_image(self, image, artifact_file: str) -> None:
        """``image``: a PIL image or a uint8 HxWx3 array."""
        if self.enabled:
            if self._best_effort(artifact_file, self.client.log_image, self.run_id, image,
                                 artifact_file=artifact_file) is False:
                local = self._unsent_copy(artifact_file)
                if local is not None:
                    from PIL import Image

                    (image if hasattr(image, "save") else Image.fromarray(image)).save(local)
                    self._keep_unsent(local, artifact_file)

    def _unsent_copy(self, artifact_file: str) -> Optional[Path]:
        """Where a text or image not sent is kept: ``<spool_dir>/<run id>/<artifact_file>``
        (None without a spool folder: it is then lost, as the warning said)."""
        if self.spool_dir is None or not self.run_id:
            return None
        local = unsent_folder(self.spool_dir, self.run_id) / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        return local

    def _keep_unsent(self, local: Path, artifact_file: str) -> None:
        folder = str(Path(artifact_file).parent)
        entry = (str(local), None if folder == "." else folder)
        if entry not in self._unsent_files:
            self._unsent_files.append(entry)

    def current_tag(self, key: str) -> Optional[str]:
        """The run's tag ``key`` as the server has it now (None: unset, or not reachable)."""
        if not self.enabled or self._paused():
            return None
        try:
            return self.client.get_run(self.run_id).data.tags.get(key)
        except tracking_errors() as error:
            if not is_permanent(error):
                self._pause()  # the calls that follow (the tags to set) must not wait on it too
            return None

    def describe(self, text: str, only_if_ours: bool = False) -> None:
        """The run's description (MLflow's note, shown and editable on the run page). With
        ``only_if_ours``, not when a person has rewritten it since ssod last wrote it (the
        tag ``ssod.description_sha1`` holds a digest of what ssod wrote)."""
        if not self.enabled:
            return
        if only_if_ours:
            note, written = self.current_tag(NOTE_TAG), self.current_tag(DESCRIPTION_DIGEST_TAG)
            if note is not None and _digest(note) != written:
                return
        self.set_tags({NOTE_TAG: text, DESCRIPTION_DIGEST_TAG: _digest(mask_secrets(text))})

    def log_model(self, model, name: str, step: int, metadata: Mapping[str, Any], code_paths: list[str],
                  registered_name: str = "") -> Optional[str]:
        """``model`` (an ``nn.Module`` on the CPU) as an MLflow logged model of this run, with
        MLflow's PyTorch flavor: ``mlflow.pytorch.load_model("models:/<id>")`` gives it back;
        ``registered_name`` also registers it as a version of that model. The code it needs
        (``code_paths``) travels with it. Returns the model's URI, or None when it failed (a
        warning: the checkpoint still holds the weights)."""
        if not self.enabled:
            return None
        from importlib.metadata import version

        import mlflow.pytorch

        requirements = [f"{package}=={version(package)}" for package in ("torch", "torchvision")]
        if self._paused():
            self.failures += 1
            log.warning("MLflow paused after a failure: the logged model %s is skipped (the checkpoint has the weights)", name)
            return None
        # Its warning that pickled models run code when loaded: the model is ours, and the
        # checkpoint (weights only) is the format to share with people one does not trust.
        flavor_log = logging.getLogger("mlflow.pytorch")
        level = flavor_log.level
        flavor_log.setLevel(logging.ERROR)
        logged = None
        try:
            # MLflow's model logging reads the process-wide tracking URI; the experiment is
            # this run's (a logged model made by MlflowClient, not the active experiment).
            run = self.client.get_run(self.run_id)
            logged = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                     tags={"ssod.run_name": run.info.run_name})
            with process_tracking_uri(self.uri):
                info = mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, run_id=self.run_id,
                                                step=step, code_paths=code_paths, pip_requirements=requirements,
                                                serialization_format="pickle", metadata=dict(metadata),
                                                registered_model_name=registered_name or None)
            return info.model_uri
        except Exception as error:  # noqa: BLE001 - the run has finished; its checkpoint holds the weights
            if not is_permanent(error) and isinstance(error, tracking_errors()):
                self._pause()
            self._warn(f"logging the model {name}", error, "skipped")
            if logged is not None:
                from mlflow.entities import LoggedModelStatus

                self._best_effort(f"marking the model {name} failed", self.client.finalize_logged_model,
                                  logged.model_id, LoggedModelStatus.FAILED)
            return None
        finally:
            flavor_log.setLevel(level)

    def log_dataset(self, json_path: str | Path, name: str, context: str, details: Mapping[str, Any] = ()) -> None:
        """Record a COCO json as a run input: path, content digest (of the json, not of the
        images), and ``details`` (e.g. image count and folder) as tags of this run's input:
        MLflow keeps one dataset record per name and digest for all runs."""
        if not self.enabled:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        path = Path(json_path).resolve()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        dataset = MetaDataset(LocalArtifactDatasetSource(str(path)), name=name, digest=digest)._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context)]
        tags += [InputTag(f"ssod.{key}", mask_secrets(str(value))) for key, value in dict(details).items()]
        entity = DatasetInput(dataset, tags=tags)
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(self.run_id, datasets=[entity])
        except MlflowException:
            # Two runs starting at once (parallel tuning trials) race to insert the same
            # (experiment, name, digest) dataset row; the loser's retry reuses the row.
            self.client.log_inputs(self.run_id, datasets=[entity])

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED (held metric values, unsent tags and
        artifacts are sent first).

        What still does not get through (held values, tags such as the checkpoint step and
        the description, artifacts, the run's end) is written to the spool (``spooled``
        names the file) instead of being lost: the run is then left RUNNING on the server
        until the spool is replayed. A failure here never raises: it must not hide the
        error that may be ending the run."""
        self._stop_monitor()  # before the end: it stops by itself on a run that is not RUNNING
        if self.enabled and self.run_id:
            self._paused_until = 0.0  # the last chance: try once more
            self._flush(f"sending held metric values before ending the run {status}")
            if self._checkpoint_step is not None:
                self._unsent_tags[CHECKPOINT_STEP_TAG] = str(self._checkpoint_step)
            ended = False
            if not self._pending:
                self.set_tags(dict(self._unsent_tags))
                files, self._unsent_files = self._unsent_files, []
                for local, artifact_path in files:
                    self.log_artifact(local, artifact_path)
                if not self._unsent_tags and not self._unsent_files:
                    ended = self._best_effort(f"ending the run {status}", self.client.set_terminated, self.run_id,
                                              status=status)
            else:
                self.failures += 1  # not ended: its values must arrive first
            if ended and self.spool_dir is not None:
                shutil.rmtree(unsent_folder(self.spool_dir, self.run_id), ignore_errors=True)  # all of it was sent
            if not ended and self.spool_dir is not None:
                self.spooled = write_spool(self.spool_dir, self.run_id, self._pending, self._unsent_tags,
                                           self._unsent_files, status)
                self._pending, self._unsent_tags, self._unsent_files = [], {}, []

    def _best_effort(self, what: str, call, *args, **kwargs) -> Optional[bool]:
        """``call(...)``, a warning instead of an error. Returns True when it went through,
        False when the server did not take it (down, or left alone after a failure: worth
        another try), None when it refused it (sending it again cannot work)."""
        if self._paused():
            self.failures += 1
            log.debug("MLflow paused after a failure: %s kept for later", what)
            return False
        try:
            call(*args, **kwargs)
            return True
        except tracking_errors() as error:
            if is_permanent(error):
                self._warn(what, error, "dropped")
                return None
            self._pause()
            self._warn(what, error, "kept for later")
            return False

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _pause(self) -> None:
        self._paused_until = time.monotonic() + _PAUSE_S

    def _warn(self, what: str, error: BaseException, outcome: str) -> None:
        self.failures += 1
        log.warning("MLflow: %s failed (%s: %s); training goes on, %s", what, type(error).__name__, mask_secrets(str(error)), outcome)



NOTE_TAG = "mlflow.note.content"
DESCRIPTION_DIGEST_TAG = "ssod.description_sha1"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)

