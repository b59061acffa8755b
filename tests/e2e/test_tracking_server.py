"""A real ``mlflow server`` that goes away during training, stopped with kill -9 (connections
refused) or SIGSTOP (connections accepted, never answered), then started again on the same
store: training waits on it a bounded time, a stop request is acted on within the step with a
checkpoint, and ``ssod-sync`` leaves the run as complete as a run that never lost its server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ssod.checkpoint import list_checkpoints
from ssod.cli import sync_main
from tests.conftest import MlflowStore, tiny_overrides

# What one failed MLflow call may cost with ssod's defaults (2 attempts of at most 5 s; a
# hung server costs both), with room for a loaded machine. MLflow's own: about 4 minutes.
CALL_BOUND_S = 20


class MlflowServer:
    """``mlflow server`` on loopback with a SQLite store and proxied artifacts in ``folder``;
    ``stop`` kills it (or freezes it: SIGSTOP), ``start`` starts it again on the same port."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = folder
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "mlflow-server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert self.process.poll() is None, (self.folder / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
            time.sleep(0.5)

    def stop(self, how: str = "killed") -> None:
        """``killed``: kill -9, its port closed; ``hung``: SIGSTOP, connections accepted, never answered."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGSTOP if how == "hung" else signal.SIGKILL)
        if how != "hung":
            self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path):
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder)
    server.start()
    yield server
    server.kill()


def _args(tmp_path: Path, dataset_cache: Path, server: MlflowServer, *overrides: str) -> list[str]:
    return [*tiny_overrides(tmp_path, dataset_cache, server.uri), "tracking.log_model=false",
            "tracking.log_checkpoint_artifact=true", *overrides]  # an artifact of 70 MB to spool


def _wait_for(condition, process, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended ({process.returncode}) before {what}:\n" + \
            process.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _logged_step(server: MlflowServer, besides: tuple[str, ...] = ()) -> int:
    """The last step of ``train/loss`` the server has of the run not in ``besides`` (0: none
    yet). Which run a search lists first is no promise: the reference must be named."""
    store = MlflowStore(server.uri)
    runs = [run for run in store.runs() if run.info.run_id not in besides]
    return max(store.steps(runs[0].info.run_id, "train/loss"), default=0) if runs else 0


def _longest_wait_s(store: MlflowStore, run_id: str) -> float:
    """The longest time between two consecutive training steps' ``train/loss`` (logged each
    step, stamped when logged, held or not): one step's compute and its wait on MLflow."""
    stamps = sorted(metric.timestamp for metric in store.client.get_metric_history(run_id, "train/loss"))
    return max(later - earlier for earlier, later in zip(stamps, stamps[1:])) / 1000


def _sync(tmp_path: Path, server: MlflowServer) -> None:
    assert sync_main([str(tmp_path / "outputs"), "--uri", server.uri]) == 0
    assert not list((tmp_path / "outputs" / "tracking-spool").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_stop_request_while_the_server_is_down_checkpoints_at_once_and_ssod_sync_completes_the_run(
        how, server, trainer, dataset_cache, tmp_path: Path, report_lines):
    checkpoints = tmp_path / "outputs" / "checkpoints"
    process = trainer.start(_args(tmp_path, dataset_cache, server, "train.iterations=100000", "train.ckpt_every=100000"))
    _wait_for(lambda: _logged_step(server) >= 2, process, 240, "step 2 on the server")
    server.stop(how)
    time.sleep(3)  # the training is now in, or past, its first call to the dead server
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _wait_for(lambda: list_checkpoints(checkpoints), process, CALL_BOUND_S + 15, "the checkpoint after SIGTERM")
    checkpointed = time.monotonic() - stopped
    assert process.wait(timeout=2 * CALL_BOUND_S + 15) == 128 + signal.SIGTERM, process.log_path.read_text()[-3000:]
    exited = time.monotonic() - stopped
    output = process.log_path.read_text()
    step = list_checkpoints(checkpoints)[-1][0]
    assert f"stop requested: checkpoint saved at step {step}" in output and "tracking incomplete" in output

    server.kill()
    server.start()
    _sync(tmp_path, server)
    store = MlflowStore(server.uri)
    run = store.only_run()
    assert run.info.status == "KILLED" and run.data.tags["ssod.checkpoint_step"] == str(step)
    assert sorted(store.steps(run.info.run_id, "train/loss")) == list(range(1, step + 1))
    store.assert_no_step_twice(run.info.run_id)
    assert "console.log" in store.artifacts(run.info.run_id)
    assert "tracking incomplete" in store.read_text(run.info.run_id, "console.log")  # as the file is at the sync
    longest = _longest_wait_s(store, run.info.run_id)
    assert longest < CALL_BOUND_S
    report_lines.append(f"server {how}: longest step {longest:.1f} s, SIGTERM -> checkpoint {checkpointed:.1f} s, "
                        f"-> exit {exited:.1f} s")


@pytest.mark.slow
def test_a_run_that_finishes_while_the_server_is_down_is_complete_on_the_server_after_ssod_sync(
        server, trainer, dataset_cache, tmp_path: Path, report_lines):
    # The reference: the same run with its server up all along.
    config = ("train.iterations=30", "train.eval_every=1000")
    status, output = trainer.run(_args(tmp_path / "reference", dataset_cache, server, *config), timeout=600)
    assert status == 0, output[-3000:]
    store = MlflowStore(server.uri)
    reference = store.only_run()

    process = trainer.start(_args(tmp_path, dataset_cache, server, *config), log_name="outage.log")
    _wait_for(lambda: _logged_step(server, besides=(reference.info.run_id,)) >= 3, process, 240, "step 3 on the server")
    server.stop("killed")
    killed = time.monotonic()
    assert process.wait(timeout=600) == 3, process.log_path.read_text()[-3000:]  # 3: tracking incomplete
    ended = time.monotonic() - killed
    assert "tracking incomplete" in process.log_path.read_text()

    server.start()
    _sync(tmp_path, server)
    run = next(run for run in store.runs() if run.info.run_id != reference.info.run_id)
    run = store.client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    # As complete as the reference: the same artifacts, tags, metrics and steps.
    assert sorted(store.artifacts(run.info.run_id)) == sorted(store.artifacts(reference.info.run_id))
    assert {"console.log", "final_metrics.json", "config.yaml", "checkpoints/step-00000030.pt"} <= \
        set(store.artifacts(run.info.run_id))
    final = json.loads(store.read_text(run.info.run_id, "final_metrics.json"))
    assert set(final) == set(json.loads(store.read_text(reference.info.run_id, "final_metrics.json")))
    assert "val/teacher/bbox_AP" in final
    assert "Finished at step 30: teacher AP" in run.data.tags["mlflow.note.content"]
    assert set(run.data.tags) == set(reference.data.tags)
    assert set(run.data.metrics) >= {key for key in reference.data.metrics if not key.startswith("system/")}
    for key in ("train/loss", "val/teacher/bbox_AP", "data/labeled/images"):
        assert sorted(store.steps(run.info.run_id, key)) == sorted(store.steps(reference.info.run_id, key)), key
    store.assert_no_step_twice(run.info.run_id)
    report_lines.append(f"server killed at step 3 of 30: run ended {ended:.1f} s later, longest step "
                        f"{_longest_wait_s(store, run.info.run_id):.1f} s (reference "
                        f"{_longest_wait_s(store, reference.info.run_id):.1f} s)")
