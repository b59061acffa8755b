"""Shared fixtures: tiny configs composed like the command line, real SQLite MLflow stores.

``make_config(*overrides)`` gives the config ``ssod.train`` would get from the command
line, shrunk so a training iteration takes a fraction of a second on a CPU, with every
path (outputs, dataset cache, MLflow store) inside the test's tmp dir. ``mlflow_store``
reads back what a run logged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

# A 40-image synthetic set (4 labeled at 10%, 36 unlabeled), 96-128 px images, a narrow
# ResNet-18 FPN and few polishing samples: a step of any method takes about a second or less.
TINY_OVERRIDES = (
    "data.synthetic.num_train=40",
    "data.synthetic.num_val=8",
    "data.train_min_sizes=[96,128]",
    "data.train_max_size=160",
    "data.test_size=96",
    "data.test_max_size=160",
    "data.num_workers=0",
    "model.fpn_channels=32",
    "model.box_head_dim=64",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=150",
    "model.rpn_pre_nms_top_n_test=150",
    "model.rpn_post_nms_top_n_test=100",
    "model.rpn_batch_size_per_image=64",
    "model.box_batch_size_per_image=64",
    "method.polish_hidden=64",
    "method.reg_samples=8",
    "method.cls_samples=[4,4]",
    "method.reg_jitter_times=4",
    "method.unsup_start=0",  # semi-supervised from the first step (the main job has a burn-in)
    "method.unsup_warmup=0",
    "train.batch_labeled=1",
    "train.batch_unlabeled=1",
    "train.warmup_iters=2",
    "train.lr_steps=[1000]",
    "train.lr=0.01",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.ckpt_every=1000",
    "train.num_vis_images=1",
    "train.progress=false",
)


def tiny_overrides(tmp_dir: Path, cache_dir: Path, mlflow_uri: str, method: str = "supervised",
                   model: str = "resnet18_fpn") -> list[str]:
    """Command-line overrides of a tiny run whose outputs all live in ``tmp_dir``.

    The model is a narrow ResNet-18 FPN from scratch unless ``model`` names another
    (``efficientnet_lite0_fpn``: the main job's pretrained model, as narrow).
    """
    return [
        f"method={method}",
        f"model={model}",
        *TINY_OVERRIDES,
        f"data.cache_dir={cache_dir}",
        f"train.output_dir={tmp_dir / 'outputs'}",
        f"tracking.uri={mlflow_uri}",
    ]


# Lines for the end of the session's report (e.g. where the browser test saved its screenshots).
_REPORT_LINES: list[str] = []


@pytest.fixture
def report_lines() -> list[str]:
    return _REPORT_LINES


def pytest_terminal_summary(terminalreporter):
    if _REPORT_LINES:
        terminalreporter.section("ssod")
        for line in _REPORT_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory) -> Path:
    """One dataset cache per test session: the tiny synthetic set is generated once."""
    return tmp_path_factory.mktemp("dataset-cache")


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with its schema made once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, empty_mlflow_db: Path) -> str:
    """A fresh, real SQLite MLflow store in the test's tmp dir (a copy of the empty one)."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_config(tmp_path: Path, dataset_cache: Path, mlflow_uri: str) -> Callable:
    """``make_config(*overrides, method="supervised", model="resnet18_fpn")`` -> a composed tiny config."""
    from ssod.config import compose

    def make(*overrides: str, method: str = "supervised", model: str = "resnet18_fpn"):
        return compose([*tiny_overrides(tmp_path, dataset_cache, mlflow_uri, method, model), *overrides])

    return make


class MlflowStore:
    """Read-only view of an MLflow store for assertions."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def runs(self, experiment: str = "ssod") -> list:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client.search_runs([found.experiment_id], max_results=1000)

    def only_run(self, experiment: str = "ssod"):
        runs = self.runs(experiment)
        assert len(runs) == 1, f"expected one run, found {[(r.info.run_id, r.info.status) for r in runs]}"
        return self.client.get_run(runs[0].info.run_id)

    def steps(self, run_id: str, key: str) -> list[int]:
        """Steps of every logged value of ``key``, in logging order (duplicates kept)."""
        return [metric.step for metric in self.client.get_metric_history(run_id, key)]

    def history(self, run_id: str, key: str) -> dict[int, list[float]]:
        values: dict[int, list[float]] = {}
        for metric in self.client.get_metric_history(run_id, key):
            values.setdefault(metric.step, []).append(metric.value)
        return values

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Every artifact file path of the run (recursive)."""
        found = []
        for info in self.client.list_artifacts(run_id, path):
            found.extend(self.artifacts(run_id, info.path) if info.is_dir else [info.path])
        return found

    def logged_models(self, run_id: str) -> list:
        """The MLflow logged models the run produced."""
        run = self.client.get_run(run_id)
        return self.client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")

    def read_text(self, run_id: str, path: str) -> str:
        local = self.client.download_artifacts(run_id, path)
        return Path(local).read_text()

    def assert_no_step_twice(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        for key in run.data.metrics:
            steps = self.steps(run_id, key)
            assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"


@pytest.fixture
def mlflow_store(mlflow_uri: str) -> MlflowStore:
    return MlflowStore(mlflow_uri)


@pytest.fixture
def tiny_args(tmp_path: Path, dataset_cache: Path, mlflow_uri: str) -> Callable:
    """``tiny_args(method)`` -> the same tiny overrides as ``make_config``, for a command line."""

    def args(method: str = "supervised") -> list[str]:
        return tiny_overrides(tmp_path, dataset_cache, mlflow_uri, method)

    return args


class Trainer:
    """Training subprocesses in one working directory, each logging to its own file."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], script: Path | None = None, log_name: str = "train.log", launcher=()) -> subprocess.Popen:
        """``python -m ssod.train args`` (or ``python script args``) in the background; a
        ``launcher`` such as ``[torchrun, --nproc_per_node, 2]`` takes the place of ``python``."""
        head = [str(script)] if script else ["-m", "ssod.train"]
        command = [*launcher, *([] if launcher else [sys.executable]), *head, *args]
        with open(self.cwd / log_name, "w") as log:
            process = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        process.log_path = self.cwd / log_name
        self.started.append(process)
        return process

    def kill_leftovers(self) -> None:
        """Kill what a failed test left running: each started process and its children (its own session)."""
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def run(self, args: list[str], script: Path | None = None, log_name: str = "train.log", timeout: float = 300, launcher=()):
        """Run to the end; returns (exit status, output)."""
        process = self.start(args, script, log_name, launcher)
        process.wait(timeout=timeout)
        return process.returncode, process.log_path.read_text()


@pytest.fixture
def trainer(tmp_path: Path):
    trainer = Trainer(tmp_path)
    yield trainer
    trainer.kill_leftovers()


@pytest.fixture
def accelerator():
    """A CPU Accelerator; accelerate's process-wide state is reset afterwards (device and
    precision included), so the next test may choose others."""
    from accelerate import Accelerator

    from ssod.step import forget_accelerator

    accelerator = Accelerator(cpu=True)
    yield accelerator
    forget_accelerator(accelerator)
