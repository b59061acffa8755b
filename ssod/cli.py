"""What the console entry points share: a user's error is one line, passwords never print.

A user's error names a fault of the input or the machine (a value out of range, a broken
file, a folder in use, missing weights, a server down), not of the code: the command
prints ``<prog>: error: <message>`` and exits 2. Anything else is a bug and keeps its
traceback; so does every error with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from ssod.checkpoint import CheckpointError
from ssod.config import ConfigError
from ssod.data.coco import DatasetError
from ssod.models.efficientnet import WeightsError
from ssod.tracking import TrackingUnreachable, mask_console

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, TrackingUnreachable, WeightsError)


def one_line_errors(prog: str, main: Callable[..., int], *args) -> int:
    """Run ``main(*args)`` with the console masked; a user's error becomes one line and status 2."""
    from hydra.errors import ConfigCompositionException

    mask_console()
    try:
        return main(*args)
    except (*USER_ERRORS, ConfigCompositionException) as error:
        return user_error_status(prog, error)


def user_error_status(prog: str, error: Exception) -> int:
    """Print ``error`` as one line and return the exit status 2 (``HYDRA_FULL_ERROR=1``: raise it)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
