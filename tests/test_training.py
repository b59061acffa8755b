"""ssod.training's choices before a run starts (the runs themselves are in tests/e2e/)."""

from __future__ import annotations

import logging

import pytest

from ssod.session import mixed_precision


@pytest.mark.parametrize("launcher, configured, used, warned", [
    (None, None, "no", False),        # plain python: full precision
    ("bf16", None, "bf16", False),    # accelerate launch --mixed_precision bf16, config left null
    ("bf16", "bf16", "bf16", False),
    ("bf16", "fp16", "fp16", True),   # an explicit config value wins, and says it overrides
    (None, "fp16", "fp16", False),
])
def test_the_launchers_precision_is_used_unless_the_config_names_one(launcher, configured, used, warned, monkeypatch,
                                                                      caplog):
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    with caplog.at_level(logging.WARNING):
        assert mixed_precision(configured) == used
    assert ("overrides the launcher's mixed precision" in caplog.text) == warned
