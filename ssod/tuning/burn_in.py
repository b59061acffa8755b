"""A study's shared burn-in: trained once per base config (data split and seed included), then
continued by every trial (``train.init_from`` + ``train.init_continue``: step, schedule, EMA
counters, momentum), so that trials spend their iterations where the searched values act.

The burn-in lives in ``tune.burn_in_dir`` (default ``<tune.output_dir>/burn-ins``; on several
machines a path they all see) under a key of the base overrides: a worker that finds it
continues it, one that finds another worker training it waits on its lock (``flock``), and a
burn-in interrupted mid-way resumes from its own checkpoints. Two studies with the same base
config share one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
from pathlib import Path

from ssod.checkpoint import checkpoint_path
from ssod.tuning.settings import StudySetup
from ssod.tuning.space import override

log = logging.getLogger(__name__)

# Searched keys a shared burn-in cannot serve: those that act only during it, and those that
# change what it trains (its data, model and seed are fixed when it is made).
ACTS_ONLY_IN_BURN_IN = ("method.unsup_start", "train.warmup_iters", "train.warmup_factor")
FIXED_BY_BURN_IN = ("data.", "model.", "train.seed", "train.init_from", "train.iterations")


def check_burn_in_space(setup: StudySetup) -> None:
    """Refuse, in one line, a searched key that the shared burn-in makes meaningless."""
    if not setup.tune.burn_in:
        return
    for key in setup.tune.space:
        if key in ACTS_ONLY_IN_BURN_IN:
            raise ValueError(f"tune.space searches {key}, which acts only during the shared burn-in "
                             f"(tune.burn_in={setup.tune.burn_in}) that trials skip: remove it, or set tune.burn_in=0")
        if key.startswith(FIXED_BY_BURN_IN):
            raise ValueError(f"tune.space searches {key}, which the shared burn-in (tune.burn_in={setup.tune.burn_in}) "
                             "fixes for every trial: remove it, or set tune.burn_in=0")


def burn_in_dir(setup: StudySetup) -> Path:
    """Where the burn-in of this study's base config lives."""
    tune = setup.tune
    root = Path(tune.burn_in_dir).expanduser() if tune.burn_in_dir else setup.study_dir.parent / "burn-ins"
    root = root if root.is_absolute() else setup.project_dir / root
    # Where runs are tracked does not change what the burn-in trains.
    trains = [o for o in setup.fixed_overrides if not o.lstrip("+~").startswith("tracking.")]
    key = hashlib.sha1(json.dumps([trains, tune.burn_in]).encode()).hexdigest()[:12]
    return root / f"burn-in-{tune.burn_in}-{key}"


def with_shared_burn_in(setup: StudySetup, trainer=None) -> StudySetup:
    """``setup`` whose trials continue the shared burn-in (trained here first if missing);
    ``setup`` itself when ``tune.burn_in`` is 0."""
    tune = setup.tune
    if not tune.burn_in:
        return setup
    check_burn_in_space(setup)
    directory = burn_in_dir(setup)
    checkpoint = burn_in_checkpoint(setup)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker training it: wait for it
        if not checkpoint.is_file():
            log.info("training the shared burn-in (%d iterations) in %s", tune.burn_in, directory)
            _train_burn_in(setup, directory, trainer)
    if not checkpoint.is_file():
        raise RuntimeError(f"the shared burn-in did not reach step {tune.burn_in}: see {directory}/console.log")
    return dataclasses.replace(setup, fixed_overrides=[*setup.fixed_overrides, *continue_overrides(setup)])


def continue_overrides(setup: StudySetup) -> list[str]:
    """What makes a run continue the study's shared burn-in (none without one)."""
    if not setup.tune.burn_in:
        return []
    return [override("train.init_from", str(burn_in_checkpoint(setup))), "train.init_continue=true",
            f"method.unsup_start={setup.tune.burn_in}"]


def burn_in_checkpoint(setup: StudySetup) -> Path:
    """The shared burn-in's final checkpoint (whether or not it exists yet)."""
    return checkpoint_path(burn_in_dir(setup) / "checkpoints", setup.tune.burn_in)


def _train_burn_in(setup: StudySetup, directory: Path, trainer=None) -> None:
    from ssod.config import compose

    if trainer is None:
        from ssod.training import run as trainer
    iterations = setup.tune.burn_in
    resume = ["train.resume=auto"] if (directory / "checkpoints").is_dir() else []
    cfg = compose([
        *setup.fixed_overrides, f"train.iterations={iterations}", f"method.unsup_start={iterations}",
        f"train.eval_every={iterations}", f"train.ckpt_every={iterations}", "train.progress=false",
        "train.evaluate_test=false",
        override("train.output_dir", str(directory)), override("train.run_name", f"{setup.tune.study_name}-burn-in"),
        override("tracking.uri", setup.tracking_uri), override("tracking.experiment", setup.experiment), *resume,
    ])
    trainer(cfg)
