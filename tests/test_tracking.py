"""The one door to MLflow: runs, params, metrics, statuses and secrets, in a real SQLite store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ssod.masking import mask_secrets
from ssod.mlflow_client import artifact_location_for, default_tracking_uri
from ssod.tracking import CHECKPOINT_STEP_TAG, Tracker

SECRET_URI = "postgresql+psycopg2://mlflow:s3cr3t-Pa55@db.example.org:5432/mlflow"


@pytest.mark.parametrize(
    "text, expected",
    [
        (SECRET_URI, "postgresql+psycopg2://mlflow:***@db.example.org:5432/mlflow"),
        ("http://user:p%40ss:word@host/x", "http://user:***@host/x"),
        ("s3://:token@bucket/key", "s3://:***@bucket/key"),
        ("postgresql+psycopg2://ssod:pa/ss+q=@db:5432/optuna", "postgresql+psycopg2://ssod:***@db:5432/optuna"),
        (
            "primary postgresql://a:one@h1/db, replica mysql://b:two@h2/db",
            "primary postgresql://a:***@h1/db, replica mysql://b:***@h2/db",
        ),
        ("uri: 'sqlite:////tmp/mlflow.db'", "uri: 'sqlite:////tmp/mlflow.db'"),
        ("https://user@host/path", "https://user@host/path"),  # a user name alone is not a secret
        ("http://host:5000/api", "http://host:5000/api"),  # a port is not a password
        ("not a uri: a:b@c", "not a uri: a:b@c"),
    ],
)
def test_mask_secrets(text: str, expected: str):
    assert mask_secrets(text) == expected


def test_default_tracking_uri_is_an_absolute_sqlite_file_unless_the_environment_says(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(".")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert artifact_location_for(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow:5000"
    assert artifact_location_for("http://mlflow:5000") is None


def test_the_experiment_opens_on_model_training_and_ssods_runs_view(mlflow_uri: str, mlflow_store):
    """The experiment carries the runs table's shared view (an older experiment gets it at a
    run's start), the links say workflowType=machine_learning, and MLflow's own link lines
    (without it) are not printed."""
    from ssod.mlflow_view import RUNS_VIEW_TAG, run_url, runs_url, runs_view_state

    older = mlflow_store.client.create_experiment("made-before")
    tracker = Tracker(mlflow_uri, "made-before")
    run_id = tracker.start("name")
    tags = mlflow_store.client.get_experiment(older).tags
    assert tags[RUNS_VIEW_TAG] == runs_view_state() and tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[RUNS_VIEW_TAG])
    assert "params.`method`" in view["selectedColumns"] and view["orderByKey"] == "metrics.`final/teacher_AP`"
    assert tracker.links() == (f"`mlflow ui --backend-store-uri {mlflow_uri}`, then runs {runs_url('http://127.0.0.1:5000', older)}"
                               f" ; this run {run_url('http://127.0.0.1:5000', older, run_id)}")
    assert runs_url("http://h:5000", "3") == ("http://h:5000/#/experiments/3/runs?workflowType=machine_learning"
                                              "&viewStateShareKey=ssod-runs")
    tracker.end("FINISHED")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    server = Tracker("http://user:secret@mlflow:5000/", "x", enabled=False)
    server.enabled, server.run_id, server.experiment_id = True, "abc", "2"
    assert server.links() == ("runs http://user:***@mlflow:5000/#/experiments/2/runs?workflowType=machine_learning"
                              "&viewStateShareKey=ssod-runs ; this run "
                              "http://user:***@mlflow:5000/#/experiments/2/runs/abc?workflowType=machine_learning")


def test_a_generated_run_name_the_experiment_has_is_numbered(mlflow_uri: str, mlflow_store):
    names = []
    for distinct in (True, True, True, False):
        tracker = Tracker(mlflow_uri, "names")
        names.append(mlflow_store.client.get_run(tracker.start("polish_teacher 10% seed0", distinct=distinct)).info.run_name)
        tracker.end("FINISHED")
    tracker = Tracker(mlflow_uri, "names")
    names.append(mlflow_store.client.get_run(tracker.start("polish_teacher 10% seed0 lr=1", distinct=True)).info.run_name)
    assert names == ["polish_teacher 10% seed0", "polish_teacher 10% seed0 #2", "polish_teacher 10% seed0 #3",
                     "polish_teacher 10% seed0", "polish_teacher 10% seed0 lr=1"]


def test_a_run_logs_params_metrics_artifacts_and_its_status(tmp_path: Path, mlflow_uri: str, mlflow_store):
    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name", {"db": SECRET_URI})
    tracker.log_params({"train.lr": 0.01, "data.train_json": SECRET_URI, "long": "x" * 7000, "none": None})
    tracker.log_metrics({"a": torch.tensor(1.5), "b": np.float32(2.0), "c": 3, "nan": float("nan")}, step=10)
    tracker.log_text(f"uri: {SECRET_URI}\n", "config.yaml")
    tracker.log_dict({"val/teacher/bbox_AP": 0.5, "pseudo/precision/raw": float("nan"), "n": torch.tensor(3),
                      "per_class": np.array([0.25, np.nan])}, "final_metrics.json")
    tracker.end("FINISHED")

    run = mlflow_store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "name"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.params["data.train_json"] == mask_secrets(SECRET_URI)
    assert len(run.data.params["long"]) == 6000 and run.data.params["none"] == "None"
    assert run.data.tags["db"] == mask_secrets(SECRET_URI)
    assert run.data.metrics == {"a": 1.5, "b": 2.0, "c": 3.0}  # NaN is not stored
    assert mlflow_store.steps(run_id, "a") == [10]
    config = mlflow_store.read_text(run_id, "config.yaml")
    assert "s3cr3t" not in config and "mlflow:***@db.example.org" in config
    # Strict JSON: an undefined metric is null, not a bare NaN that strict readers reject.
    strict = json.loads(mlflow_store.read_text(run_id, "final_metrics.json"), parse_constant=pytest.fail)
    assert strict == {"val/teacher/bbox_AP": 0.5, "pseudo/precision/raw": None, "n": 3, "per_class": [0.25, None]}


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_end_sets_the_status_we_mean(mlflow_uri: str, mlflow_store, status: str):
    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name")
    assert mlflow_store.client.get_run(run_id).info.status == "RUNNING"
    tracker.end(status)
    assert mlflow_store.client.get_run(run_id).info.status == status


def test_a_resumed_run_skips_the_steps_it_already_has(mlflow_uri: str, mlflow_store):
    first = Tracker(mlflow_uri, "unit")
    run_id = first.start("name")
    first.log_params({"train.lr": 0.01})
    for step in (2, 4, 6):
        first.log_metrics({"train/loss": float(step)}, step)
    first.log_metrics({"val/AP": 0.1}, 4)
    # SIGKILL: no end(), the run stays RUNNING; a resume reopens it.
    second = Tracker(mlflow_uri, "unit")
    assert second.start("name", {"resumed": "yes"}, run_id=run_id) == run_id
    assert second.logged_steps == {"train/loss": 6, "val/AP": 4}
    second.log_params({"train.lr": 0.02, "train.iterations": 12})  # existing params are not re-logged
    # The resumed run recomputes steps 4 and 6 from an older checkpoint. The first run was
    # killed during its evaluation at 6: the resumed run logs it, and nothing twice.
    for step in (4, 6, 8):
        second.log_metrics({"train/loss": 100.0 + step, "val/AP": 0.2}, step)
    second.end("FINISHED")

    assert [run.info.run_id for run in mlflow_store.runs("unit")] == [run_id]
    run = mlflow_store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "yes"
    assert run.data.params == {"train.lr": "0.01", "train.iterations": "12"}
    assert mlflow_store.history(run_id, "train/loss") == {2: [2.0], 4: [4.0], 6: [6.0], 8: [108.0]}
    assert mlflow_store.history(run_id, "val/AP") == {4: [0.1], 6: [0.2], 8: [0.2]}
    mlflow_store.assert_no_step_twice(run_id)


def test_nested_runs_point_at_their_parent(mlflow_uri: str, mlflow_store):
    parent = Tracker(mlflow_uri, "unit")
    parent_id = parent.start("study")
    child = Tracker(mlflow_uri, "unit")
    child_id = child.start("trial-0", parent_run_id=parent_id)
    assert mlflow_store.client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id


def test_dataset_inputs_record_path_context_and_digest(tmp_path: Path, mlflow_uri: str, mlflow_store):
    json_path = tmp_path / "train.json"
    json_path.write_text('{"images": [], "annotations": [], "categories": []}')
    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name")
    tracker.log_dataset(json_path, name="train.json", context="train")
    (entry,) = mlflow_store.client.get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.name == "train.json" and str(json_path) in entry.dataset.source
    assert len(entry.dataset.digest) == 16
    assert {(tag.key, tag.value) for tag in entry.tags} == {("mlflow.data.context", "train")}
    # The same json read with other images by another run: MLflow shares the dataset record
    # (same name and digest), each run keeps its own details.
    other = Tracker(mlflow_uri, "unit")
    other_id = other.start("other")
    other.log_dataset(json_path, name="train.json", context="train", details={"images": 4, "image_dir": "/data/B"})
    (entry,) = mlflow_store.client.get_run(other_id).inputs.dataset_inputs
    assert {(tag.key, tag.value) for tag in entry.tags} >= {("ssod.images", "4"), ("ssod.image_dir", "/data/B")}
    (entry,) = mlflow_store.client.get_run(run_id).inputs.dataset_inputs
    assert {(tag.key, tag.value) for tag in entry.tags} == {("mlflow.data.context", "train")}


def test_a_disabled_tracker_never_touches_the_store(tmp_path: Path, mlflow_uri: str):
    tracker = Tracker(mlflow_uri, "unit", enabled=False)
    assert tracker.start("name") == ""
    tracker.log_params({"a": 1})
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.log_text("x", "x.txt")
    tracker.set_tags({"a": "b"})
    tracker.end("FINISHED")
    assert not (tmp_path / "mlartifacts").exists()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_uri).search_experiments(filter_string="name = 'unit'") == []


def test_a_tracking_outage_during_training_is_a_warning_and_loses_no_metric(mlflow_uri: str, mlflow_store, monkeypatch, caplog):
    """The store is real; only its outage is simulated: the client's calls raise as an
    unreachable server's do, then work again."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name")
    tracker.log_metrics({"train/loss": 1.0}, 1)
    working = {name: getattr(tracker.client, name) for name in ("log_batch", "log_text", "set_terminated")}

    calls = []

    def unavailable(*args, **kwargs):
        calls.append(1)
        raise MlflowException("API request failed: 503 Service Unavailable")

    for name in working:
        monkeypatch.setattr(tracker.client, name, unavailable)
    tracker.log_metrics({"train/loss": 2.0, "val/AP": 0.5}, 2)
    tracker.log_text("a\n", "bad_images.txt")  # the server is left alone after a failure
    assert len(calls) == 1
    tracker.end("FINISHED")  # tries once more, and does not raise: it must not hide an error ending the run
    # end sent the held values once more (failing, so closing the run was skipped too)
    assert len(calls) == 2 and tracker.failures == 4 and "training goes on" in caplog.text
    for name, call in working.items():
        monkeypatch.setattr(tracker.client, name, call)
    tracker.log_metrics({"train/loss": 3.0}, 3)
    tracker.end("FINISHED")
    assert mlflow_store.history(run_id, "train/loss") == {1: [1.0], 2: [2.0], 3: [3.0]}
    assert mlflow_store.history(run_id, "val/AP") == {2: [0.5]}
    assert mlflow_store.client.get_run(run_id).info.status == "FINISHED"


def test_metric_values_the_server_refuses_are_dropped_not_held(mlflow_uri: str, mlflow_store):
    """Held forever, one refused value would fail every later batch it shares."""
    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name")
    # The real store refuses a key over MLflow's 250 characters; the others in its batch arrive.
    tracker.log_metrics({"train/loss": 1.0, "x" * 300: 1.0, "val/AP": 0.5}, 1)
    tracker.log_metrics({"train/loss": 2.0}, 2)  # not paused: the server itself is fine
    tracker.end("FINISHED")
    assert mlflow_store.history(run_id, "train/loss") == {1: [1.0], 2: [2.0]}
    assert mlflow_store.history(run_id, "val/AP") == {1: [0.5]} and tracker.failures == 1


def test_the_checkpoint_tag_skipped_during_an_outage_is_set_when_the_run_ends(mlflow_uri: str, mlflow_store, monkeypatch):
    """The tag says how far the run's checkpoints went: going back before it starts a new
    run. Left behind by an outage, a later going back would reopen the run and mix steps."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker(mlflow_uri, "unit")
    run_id = tracker.start("name")
    tracker.note_checkpoint(200)
    working = tracker.client.set_tag

    def unavailable(*args, **kwargs):
        raise MlflowException("API request failed: 503 Service Unavailable")

    monkeypatch.setattr(tracker.client, "set_tag", unavailable)
    tracker.note_checkpoint(300)
    monkeypatch.setattr(tracker.client, "set_tag", working)
    tracker.log_metrics({"train/loss": 1.0}, 300)  # still paused: held, not sent
    assert mlflow_store.client.get_run(run_id).data.tags[CHECKPOINT_STEP_TAG] == "200"
    tracker.end("KILLED")
    assert mlflow_store.client.get_run(run_id).data.tags[CHECKPOINT_STEP_TAG] == "300"
    reopened = Tracker(mlflow_uri, "unit")
    assert reopened.start("name", run_id=run_id, resume_step=200) != run_id
    assert reopened.branched_from == run_id


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


def test_an_unreachable_tracking_server_fails_fast_in_one_masked_line(monkeypatch):
    import socket

    from ssod.mlflow_client import TrackingUnreachable, check_reachable

    uri = f"http://user:s3cret@127.0.0.1:{_closed_port()}"
    attempts = []
    real = socket.create_connection

    def counted(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    with pytest.raises(TrackingUnreachable) as caught:
        check_reachable(uri)
    # Fast by construction: one attempt with a bounded timeout, not MLflow's retry loop.
    assert len(attempts) == 1 and attempts[0][1] is not None and attempts[0][1] <= 10
    message = str(caught.value)
    assert "s3cret" not in message and "http://user:***@127.0.0.1" in message
    assert "tracking.enabled=false" in message and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in message
    check_reachable("sqlite:////nowhere/mlflow.db")  # not a server: nothing to check


def test_masked_console_streams_hide_passwords_from_anything_written():
    import io

    from ssod.masking import MaskedStream

    sink = io.StringIO()
    stream = MaskedStream(sink)
    assert stream.write("View run x at: http://user:s3cret@host:5000/#/runs/1\n") == 53
    assert sink.getvalue() == "View run x at: http://user:***@host:5000/#/runs/1\n"
    assert stream.getvalue() == sink.getvalue()  # everything else is the wrapped stream's


@pytest.mark.slow
def test_ssod_train_prints_no_password_when_the_server_is_down(tmp_path: Path, dataset_cache: Path):
    import subprocess
    import sys

    uri = f"http://user:s3cret@127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "ssod.train", f"tracking.uri={uri}", f"data.cache_dir={dataset_cache}",
         f"train.output_dir={tmp_path / 'out'}", "train.iterations=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "s3cret" not in output and "user:***@127.0.0.1" in output
    # One line that says what to do, not a traceback.
    assert result.stderr.strip().splitlines()[-1].startswith("ssod-train: error: MLflow tracking server http://user:***@")
    assert "tracking.enabled=false" in output and "Traceback" not in output


def _server_down(monkeypatch, client_class) -> None:
    """Every write of any MLflow client raises as an unreachable server's does (the store is real)."""
    from mlflow.exceptions import MlflowException

    def unavailable(*args, **kwargs):
        raise MlflowException("API request failed: 503 Service Unavailable")

    for name in ("log_batch", "set_terminated", "set_tag", "log_text", "log_dict", "log_artifact", "log_image"):
        monkeypatch.setattr(client_class, name, unavailable)


def test_values_the_server_never_took_are_spooled_and_sent_by_the_next_start(mlflow_uri: str, mlflow_store,
                                                                              monkeypatch, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    spool = tmp_path / "out" / "tracking-spool"
    tracker = Tracker(mlflow_uri, "unit", spool_dir=spool)
    run_id = tracker.start("name")
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.note_checkpoint(2)
    with monkeypatch.context() as patch:
        _server_down(patch, MlflowClient)
        tracker.log_metrics({"train/loss": 2.0, "val/AP": 0.5}, 2)
        tracker.end("FINISHED")
    assert tracker.spooled == spool / f"{run_id}.json" and tracker.spooled.is_file()
    assert mlflow_uri.split("///")[-1] not in tracker.spooled.read_text()  # no URI (no password) in the file
    run = mlflow_store.client.get_run(run_id)
    assert run.info.status == "RUNNING" and mlflow_store.history(run_id, "train/loss") == {1: [1.0]}
    # The next run in the same folder sends it first, whatever it is.
    Tracker(mlflow_uri, "unit", spool_dir=spool).start("next")
    assert not tracker.spooled.exists()
    run = mlflow_store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[CHECKPOINT_STEP_TAG] == "2"
    assert mlflow_store.history(run_id, "train/loss") == {1: [1.0], 2: [2.0]}
    assert mlflow_store.history(run_id, "val/AP") == {2: [0.5]}


def test_a_training_whose_server_is_down_at_the_end_says_so_exits_3_and_ssod_sync_completes_it(
        make_config, mlflow_store, monkeypatch, tmp_path: Path, caplog):
    from mlflow.tracking import MlflowClient

    from ssod.cli import sync_main
    from ssod.training import run

    down = []
    original = {name: getattr(MlflowClient, name) for name in ("log_batch", "set_terminated")}

    def flaky(name):
        def call(self, *args, **kwargs):
            if down:
                from mlflow.exceptions import MlflowException

                raise MlflowException("API request failed: 503 Service Unavailable")
            return original[name](self, *args, **kwargs)
        return call

    for name in original:
        monkeypatch.setattr(MlflowClient, name, flaky(name))
    # The server goes away after the final evaluation: the run's end is held (and spooled).
    result = run(make_config("train.iterations=2", "train.eval_every=1000"), on_eval=lambda step, metrics: down.append(step))
    assert result.tracking_incomplete and "tracking incomplete" in caplog.records[-1].getMessage()
    assert mlflow_store.only_run().info.status == "RUNNING"
    assert sorted((tmp_path / "outputs" / "tracking-spool").glob("*.json"))
    down.clear()
    assert sync_main([str(tmp_path / "outputs"), "--uri", mlflow_store.uri]) == 0
    assert sync_main([str(tmp_path / "no-such-run"), "--uri", mlflow_store.uri]) == 2
    run_info = mlflow_store.only_run()
    assert run_info.info.status == "FINISHED" and "val/teacher/bbox_AP" in run_info.data.metrics
    assert not list((tmp_path / "outputs" / "tracking-spool").glob("*.json"))


def test_tags_texts_pictures_and_files_the_server_never_took_are_spooled_and_sent_by_the_replay(
        mlflow_uri: str, mlflow_store, monkeypatch, tmp_path: Path):
    """What is not sent during an outage (the description, console.log, final_metrics.json, a
    picture) reaches the run when the spool is replayed, as if the server had been there."""
    from mlflow.tracking import MlflowClient

    from ssod.spool import replay_spool
    from ssod.tracking import NOTE_TAG

    spool = tmp_path / "out" / "tracking-spool"
    console = tmp_path / "out" / "console.log"
    console.parent.mkdir()
    console.write_text("first line\n")
    tracker = Tracker(mlflow_uri, "unit", spool_dir=spool)
    run_id = tracker.start("name")
    with monkeypatch.context() as patch:
        _server_down(patch, MlflowClient)
        tracker.log_metrics({"train/loss": 2.0}, 2)
        tracker.describe("Finished at step 2: teacher AP 50.0")
        tracker.log_dict({"val/AP": 0.5}, "final_metrics.json")
        tracker.log_image(np.zeros((4, 6, 3), dtype=np.uint8), "pseudo_labels/step_00000002_0.png")
        tracker.log_artifact(console)
        tracker.end("FINISHED")
    console.write_text("first line\nlast line\n")  # sent as the file is at the replay
    assert mlflow_store.artifacts(run_id) == [] and mlflow_store.client.get_run(run_id).info.status == "RUNNING"
    assert replay_spool(spool, mlflow_uri) == (1, 0) and list(spool.iterdir()) == []
    run = mlflow_store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[NOTE_TAG] == "Finished at step 2: teacher AP 50.0"
    assert sorted(mlflow_store.artifacts(run_id)) == ["console.log", "final_metrics.json",
                                                      "pseudo_labels/step_00000002_0.png"]
    assert mlflow_store.read_text(run_id, "console.log").endswith("last line\n")
    assert json.loads(mlflow_store.read_text(run_id, "final_metrics.json")) == {"val/AP": 0.5}
    assert mlflow_store.history(run_id, "train/loss") == {2: [2.0]}


def test_a_replay_cut_short_sends_nothing_twice(mlflow_uri: str, mlflow_store, monkeypatch, tmp_path: Path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ssod.spool import replay_spool

    spool = tmp_path / "tracking-spool"
    tracker = Tracker(mlflow_uri, "unit", spool_dir=spool)
    run_id = tracker.start("name")
    with monkeypatch.context() as patch:
        _server_down(patch, MlflowClient)
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.log_text("x\n", "bad_images.txt")
        tracker.end("KILLED")
    with monkeypatch.context() as patch:  # the server goes away again after the metric values
        patch.setattr(MlflowClient, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(MlflowException("503")))
        assert replay_spool(spool, mlflow_uri) == (0, 1)
    assert replay_spool(spool, mlflow_uri) == (1, 0)
    assert mlflow_store.history(run_id, "train/loss") == {1: [1.0]}
    assert mlflow_store.artifacts(run_id) == ["bad_images.txt"]
    assert mlflow_store.client.get_run(run_id).info.status == "KILLED"


def test_mlflow_http_calls_are_bounded_by_the_config_else_the_environment_else_seconds(monkeypatch):
    import ssod.mlflow_client as tracking

    names = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "_USER_REQUEST_SETTINGS", dict.fromkeys(names))
    tracking.bound_requests()
    assert [os.environ[name] for name in names] == ["5", "1", "1"]  # not MLflow's 120 s, 7 retries, factor 2
    monkeypatch.setattr(tracking, "_USER_REQUEST_SETTINGS", {**dict.fromkeys(names), "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"})
    tracking.bound_requests(retries=3)
    assert [os.environ[name] for name in names] == ["30", "3", "1"]  # the user's variable, the config's value
    tracking.bound_requests(timeout_s=2)
    assert [os.environ[name] for name in names] == ["2", "1", "1"]  # a config value wins; an earlier one is not kept
