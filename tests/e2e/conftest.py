"""The end-to-end tier: every test here trains (or evaluates) for real, in-process or in
subprocesses, and is marked ``slow`` (``pytest -m "not slow"`` leaves the tier out)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.slow)
