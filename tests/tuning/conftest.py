"""Fixtures of the tuning tests: a tiny project (``tuning_project.Project``) and a PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tuning_project import ENV_KEYS, REPO, Project


@pytest.fixture
def project(tmp_path: Path, dataset_cache: Path, empty_mlflow_db: Path, monkeypatch) -> Project:
    """Uses conftest's session-wide dataset cache and empty MLflow store."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path, dataset_cache)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    directory = Path(f"/tmp/ssod-pg-{os.getpid()}")
    script = REPO / ".ci" / "postgres.sh"
    try:
        started = subprocess.run(["bash", str(script), "start", str(directory)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("PostgreSQL could not be started: .ci/postgres.sh timed out")
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL could not be started (.ci/postgres.sh exit {started.returncode}): {started.stderr[-800:]}")
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(script), "stop", str(directory)], capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)
