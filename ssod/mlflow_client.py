"""Talking to MLflow at all: how long a call may wait on a server that does not answer, a
fast check that it answers, the default store, and which errors a call may meet (the
store refused it for good, or the server is away for now)."""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Optional

from ssod.masking import mask_secrets

# What one MLflow HTTP call may cost when neither the config nor the environment says:
# seconds per attempt (connect, then read), retries after the first attempt, and the
# backoff factor between retries (urllib3 sleeps 0 s before the first retry). MLflow's own
# defaults (120 s, 7 retries, factor 2) block a call to a dead server for about 4 minutes.
_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": 5, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1,
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1}
# The variables as the user set them, read once: a later ``bound_requests`` must not take
# the values an earlier one set for the user's.
_USER_REQUEST_SETTINGS = {name: os.environ.get(name) for name in _REQUEST_DEFAULTS}


def bound_requests(timeout_s: Optional[int] = None, retries: Optional[int] = None) -> None:
    """Bound how long an MLflow HTTP call (this process's, its system metrics monitor's too)
    waits on a tracking server that does not answer: attempts of at most ``timeout_s``
    seconds each, ``retries`` after the first. A value given here wins; None leaves the
    user's ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (and
    ``..._BACKOFF_FACTOR``) when set, else takes ``_REQUEST_DEFAULTS`` (5 s, 1 retry): a
    failed call then returns within about ``(retries + 1) * timeout_s`` seconds (twice that
    when both the connection and the answer are slow). MLflow reads them at every call."""
    given = {"MLFLOW_HTTP_REQUEST_TIMEOUT": timeout_s, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries}
    for name, default in _REQUEST_DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = _USER_REQUEST_SETTINGS[name] or default
        os.environ[name] = str(value)


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer at start."""


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast when ``uri`` is an HTTP(S) tracking server that does not answer.

    MLflow's client would retry for minutes (urllib3 backoff) and then raise a traceback; one
    connection attempt says the same at once, in one line that names the way out.
    """
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise TrackingUnreachable(
            f"MLflow tracking server {mask_secrets(uri)} is unreachable ({error.strerror or error}): start it, "
            "point tracking.uri / MLFLOW_TRACKING_URI at one that runs, or train without tracking "
            "(tracking.enabled=false); tracking.request_timeout_s and tracking.request_retries (or "
            "MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES) bound how long a call waits during a run"
        ) from None


def quiet_mlflow_links() -> None:
    """Stop MLflow printing its own "View run ... at" / "View experiment at" lines when a run
    ends on a tracking server: they lack ``workflowType``, so in a fresh browser they open
    the GenAI pages. ssod prints its own (``Tracker.links``)."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def default_tracking_uri(project_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite file in ``project_dir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(project_dir).resolve() / 'mlflow.db'}"


def artifact_location_for(uri: str) -> Optional[str]:
    """Artifacts beside a SQLite store (``<dir>/mlartifacts``); the server decides otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


# Errors where the server refused the values themselves: sending them again cannot work.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}


def is_permanent(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in PERMANENT_ERRORS


@contextlib.contextmanager
def process_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for a call of MLflow's fluent API,
    then both it and ``$MLFLOW_TRACKING_URI`` (which ``mlflow.set_tracking_uri`` also sets,
    and ``default_tracking_uri`` reads) exactly as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, variable = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable server or a busy store raises (requests' errors are OSErrors)."""
    from mlflow.exceptions import MlflowException

    return MlflowException, OSError
