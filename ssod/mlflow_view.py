"""What a person sees first in MLflow's web UI: the links ssod prints and the runs table's view.

MLflow 3.17's UI has two faces, GenAI (traces, evaluations) and model training (runs,
charts, models), chosen by the ``workflowType`` URL parameter (``genai`` or
``machine_learning``). Without it the UI takes the browser's saved choice (local storage
``mlflow.workflowType``), and a fresh browser has none: it defaults to ``genai``, and
``/#/experiments/<id>`` then redirects to the GenAI overview. The experiment's
``mlflow.experimentKind`` tag is not read while that switch is on (it is, by default). So
every link ssod prints carries ``workflowType=machine_learning``.

The runs table shows no param or metric column until a person picks one; MLflow's "shared
view" (an experiment tag ``mlflow.sharedViewState.<key>`` holding the table's state as JSON,
opened by ``viewStateShareKey=<key>`` in the address) shows chosen columns at once. ssod
keeps one, ``RUNS_VIEW``: method, labeled percent, seed and the final teacher AP, best first.
"""

from __future__ import annotations

import json
import urllib.parse

# The final validation APs of a finished run (COCO AP, 0-1), beside ``val/{teacher,student}/bbox_AP``'s
# history: a column and the first chart section ("final" sorts before the others).
FINAL_TEACHER_AP = "final/teacher_AP"
FINAL_STUDENT_AP = "final/student_AP"
# Params with short names, so that the runs table's columns read at a glance (the config's
# own, e.g. ``method.name``, are there too).
SHORT_PARAMS = ("method", "percent", "seed")
WORKFLOW = "workflowType=machine_learning"
# The key of ssod's shared view of the runs table (the experiment tag's suffix).
RUNS_VIEW = "ssod-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
# Where ``mlflow ui`` listens unless told otherwise.
LOCAL_UI = "http://127.0.0.1:5000"
# Kind "model training", for MLflow UIs that read the tag (those without workflow navigation).
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def runs_view_state() -> str:
    """The shared view's JSON: the runs table with the short params and the final APs as
    columns (MLflow's column ids: ``params.`name```), sorted by the final teacher AP."""
    columns = [*(f"params.`{name}`" for name in SHORT_PARAMS), f"metrics.`{FINAL_TEACHER_AP}`",
               f"metrics.`{FINAL_STUDENT_AP}`"]
    return json.dumps({"selectedColumns": columns, "orderByKey": f"metrics.`{FINAL_TEACHER_AP}`", "orderByAsc": False})


def experiment_tags() -> dict[str, str]:
    """Tags every ssod experiment carries (set at creation, and on older experiments at a run's start)."""
    return {EXPERIMENT_KIND_TAG[0]: EXPERIMENT_KIND_TAG[1], RUNS_VIEW_TAG: runs_view_state()}


def ui_base(tracking_uri: str) -> str:
    """The web UI's address for a store: an HTTP(S) tracking server is its own UI (the
    address as given, a password in it masked by the caller); any other store is read by
    ``mlflow ui``, at ``LOCAL_UI``."""
    if urllib.parse.urlsplit(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, model-training view, ssod's columns."""
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={RUNS_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page, model-training view."""
    return f"{base}/{run_route(experiment_id, run_id)}"


def run_route(experiment_id: str, run_id: str) -> str:
    """One run's page relative to the UI's address (a link inside MLflow, e.g. in a description)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"
