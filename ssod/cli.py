"""What the console entry points share: a user's error is one line, passwords never print.

A user's error names a fault of the input or the machine (a value out of range, a broken
file, a folder in use, missing weights, a server down), not of the code: the command
prints ``<prog>: error: <message>`` and exits 2. Anything else is a bug and keeps its
traceback; so does every error with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ssod.checkpoint import CheckpointError
from ssod.config import ConfigError
from ssod.data.coco import DatasetError
from ssod.masking import mask_console, mask_secrets
from ssod.mlflow_client import TrackingUnreachable, bound_requests, check_reachable, default_tracking_uri
from ssod.models.efficientnet import WeightsError
from ssod.spool import SPOOL_DIR, replay_spool


class MissingDependency(RuntimeError):
    """An optional package the command needs is not installed (the message names it)."""


USER_ERRORS = (ConfigError, CheckpointError, DatasetError, TrackingUnreachable, WeightsError, MissingDependency)


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
    message = str(error)
    cause = error.__cause__
    if type(error).__module__.startswith("hydra") and cause is not None and str(cause) not in message:
        # Hydra's "Error merging override x=y" keeps the reason in its cause.
        message = f"{message}: {cause}"
    override = getattr(error, "override", None)  # Hydra's parse error names it only there
    if isinstance(override, str) and override not in message:
        message = f"cannot parse override {override}: {message}"
    print(f"{prog}: error: {one_line(mask_secrets(message))}", file=sys.stderr)
    return 2


def one_line(message: str) -> str:
    """A multi-line message (Hydra's, OmegaConf's) as one line: its lines joined, an indented
    list after a line ending in ':' joined by commas, Hydra's config search path and OmegaConf's
    key/type detail left out."""
    pieces: list[str] = []
    listing = False  # the last piece is a heading ending in ':' and its items so far
    for raw in message.split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "reference_type=", "object_type=")):
            continue
        if listing and raw[:1].isspace():
            pieces[-1] += (" " if pieces[-1].endswith(":") else ", ") + line
        else:
            pieces.append(line)
            listing = line.endswith(":")
    return " ".join(pieces)


def sync_main(argv: Optional[list[str]] = None) -> int:
    """``ssod-sync OUTPUT_DIR [--uri URI]``: send what runs in OUTPUT_DIR could not send to
    MLflow when they ended (their ``tracking-spool``: metric values, tags such as the
    description, artifacts such as console.log, final_metrics.json and the checkpoint, the
    run's end).
    The next training in that folder does the same at its start."""
    return one_line_errors("ssod-sync", _sync, argv)


def _sync(argv: Optional[list[str]]) -> int:
    parser = argparse.ArgumentParser(prog="ssod-sync", description=sync_main.__doc__)
    parser.add_argument("output_dir", type=Path, help="a run's output folder (train.output_dir)")
    parser.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spool = args.output_dir / SPOOL_DIR
    if not args.output_dir.is_dir():
        print(f"ssod-sync: error: {args.output_dir}: no such run folder (give a run's train.output_dir)", file=sys.stderr)
        return 2
    if not spool.is_dir():
        print(f"ssod-sync: nothing to send: {spool} does not exist")
        return 0
    uri = args.uri or default_tracking_uri(Path.cwd())
    check_reachable(uri)
    bound_requests()
    done, left = replay_spool(spool, uri)
    print(f"ssod-sync: {done} spooled run(s) sent to {mask_secrets(uri)}; {left} left in {spool}")
    return 1 if left else 0
