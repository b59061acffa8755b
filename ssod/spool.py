"""What a run could not send to MLflow (its server was away at the end): written beside the
run (``<output_dir>/tracking-spool/<run id>.json`` and its files) and sent later, by the next
training in that folder or by ``ssod-sync``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Optional

from ssod.io import write_json_atomic
from ssod.masking import mask_secrets
from ssod.mlflow_client import is_permanent, quiet_mlflow_links, tracking_errors

log = logging.getLogger(__name__)


def unsent_folder(spool_dir: Path, run_id: str) -> Path:
    """Where the texts and images a run could not send are kept (beside ``<run_id>.json``)."""
    return Path(spool_dir) / run_id


def write_spool(spool_dir: Path, run_id: str, metrics: list, tags: Mapping[str, str],
                files: list[tuple[str, Optional[str]]], status: str) -> Path:
    """Write what a run could not send to ``<spool_dir>/<run_id>.json`` (merged with an
    earlier spool of the same run): metric values, tags, artifacts (a local file and the
    run's folder for it) and the status to end with. No tracking URI is stored (it may hold
    a password): the replay sends to the store it is given."""
    path = Path(spool_dir) / f"{run_id}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    artifacts = [list(entry) for entry in earlier.get("artifacts", [])]
    artifacts += [[local, folder] for local, folder in files if [local, folder] not in artifacts]
    payload = {"run_id": run_id, "status": status, "tags": {**earlier.get("tags", {}), **dict(tags)},
               "metrics": earlier.get("metrics", []) + [[m.key, m.value, m.timestamp, m.step] for m in metrics],
               "artifacts": artifacts}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(payload, path)
    return path


def replay_spool(spool_dir: Path, uri: str) -> tuple[int, int]:
    """Send every spooled run of ``spool_dir`` to the store at ``uri``: its metric values,
    artifacts, tags, and its end (the status it ended with). A file is removed once all of
    it went through, kept otherwise; what went through is taken out of it at once, so a
    later try sends nothing twice. What the store refuses (a deleted run) or a file that is
    gone is dropped with a warning. Returns (runs completed, runs left)."""
    from mlflow.tracking import MlflowClient

    files = sorted(Path(spool_dir).glob("*.json")) if Path(spool_dir).is_dir() else []
    if not files:
        return 0, 0
    quiet_mlflow_links()
    client = MlflowClient(tracking_uri=uri)
    done = 0
    for path in files:
        payload = json.loads(path.read_text())
        try:
            _replay_run(client, path, payload)
        except tracking_errors() as error:
            log.warning("MLflow: the spooled run %s (%s) could not be sent (%s: %s); the rest is kept for the next try",
                        payload["run_id"], path, type(error).__name__, mask_secrets(str(error)))
            continue
        path.unlink()
        shutil.rmtree(unsent_folder(path.parent, payload["run_id"]), ignore_errors=True)
        done += 1
    return done, len(files) - done


def _replay_run(client, path: Path, payload: dict) -> None:
    """Send one spooled run (``write_spool``'s payload), rewriting ``path`` after each part."""
    from mlflow.entities import Metric

    run_id = payload["run_id"]
    sent = 0
    while payload["metrics"]:
        chunk = [Metric(key, value, timestamp, step) for key, value, timestamp, step in payload["metrics"][:500]]
        try:
            client.log_batch(run_id, metrics=chunk)
        except tracking_errors() as error:
            if not is_permanent(error):
                raise
            for metric in chunk:  # only the refused values are lost
                _refused_is_dropped(f"{metric.key} at step {metric.step} of run {run_id}", client.log_batch, run_id,
                                    metrics=[metric])
        payload["metrics"] = payload["metrics"][len(chunk):]
        sent += len(chunk)
        write_json_atomic(payload, path)
    artifacts = payload.setdefault("artifacts", [])
    count = len(artifacts)
    while artifacts:
        local, folder = artifacts[0]
        if Path(local).is_file():
            _refused_is_dropped(f"artifact {local}", client.log_artifact, run_id, local, folder)
        else:
            log.warning("MLflow: the spooled artifact %s of run %s is gone; not sent", local, run_id)
        artifacts.pop(0)
        write_json_atomic(payload, path)
    for key, value in payload["tags"].items():
        _refused_is_dropped(f"tag {key} of run {run_id}", client.set_tag, run_id, key, value)
    _refused_is_dropped(f"the end of run {run_id}", client.set_terminated, run_id, status=payload["status"])
    log.info("MLflow: sent the spooled run %s (%d metric values, %d artifacts, %d tags; ended %s)", run_id, sent,
             count, len(payload["tags"]), payload["status"])


def _refused_is_dropped(what: str, call, *args, **kwargs) -> None:
    """``call(...)``; what the store refuses (sending it again cannot work) is dropped with a
    warning, any other error raised (the server is down: try again later)."""
    try:
        call(*args, **kwargs)
    except tracking_errors() as error:
        if not is_permanent(error):
            raise
        log.warning("MLflow: %s refused (%s); dropped", what, mask_secrets(str(error)))


# A run's spool folder, inside its output folder.
SPOOL_DIR = "tracking-spool"
