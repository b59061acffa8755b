"""``ssod-train``: train a detector (supervised, Soft Teacher or Polishing Teacher).

Run it from the project directory (where ``mlflow.db`` lives)::

    ssod-train                                   # built-in synthetic data, CPU or 1 GPU
    accelerate launch -m ssod.train experiment=synthetic method=polish_teacher
    accelerate launch --multi_gpu --num_processes 8 -m ssod.train experiment=coco_partial data.percent=10
    ssod-train train.resume=auto                 # continue the newest complete checkpoint
    ssod-train train.resume=<dir>/step-00000200.pt   # go back: a branch (later checkpoints set aside)

The entry point only composes the config (Hydra) and calls ``ssod.training.run``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from ssod.cli import USER_ERRORS, user_error_status
from ssod.config import CONF_DIR
from ssod.loop import TRACKING_INCOMPLETE_STATUS
from ssod.masking import mask_console
from ssod.step import TrainingStopped
from ssod.training import run


def main() -> Optional[float]:
    """Console entry point (``ssod-train``): Hydra's app with every password in a URI masked
    on the console (MLflow's run links, Hydra's report of a failed job, tracebacks)."""
    mask_console()  # before Hydra: its own report of a failed job must be masked too
    return _hydra_main()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    """Hydra's app: returns the teacher AP for Hydra sweepers.

    A user's error (a bad value, file, folder or server) is one line on the console and exit
    status 2; a traceback is for bugs, or for every error with ``HYDRA_FULL_ERROR=1``.
    """
    try:
        metrics = run(cfg)
    except USER_ERRORS as error:
        sys.exit(user_error_status("ssod-train", error))
    except TrainingStopped as error:  # stopped itself with a checkpoint and a reason: one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"ssod-train: error: {error}", file=sys.stderr)
        sys.exit(1)
    if metrics.status == "KILLED":
        # Stopped by a signal after a checkpoint: not a success for the job scheduler; the
        # shell's convention, 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
        sys.exit(128 + (metrics.stop_signal or signal.SIGTERM))
    if metrics.tracking_incomplete:
        sys.exit(TRACKING_INCOMPLETE_STATUS)
    value = metrics.get("val/teacher/bbox_AP")
    return None if value is None or math.isnan(value) else value


if __name__ == "__main__":
    main()
