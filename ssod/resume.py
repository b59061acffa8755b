"""Starting from a checkpoint: which one a resume takes, what a resume changed (told to
MLflow), and a schedule continued from another run (``train.init_continue``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ssod.checkpoint import find_resume_checkpoint, load_checkpoint, load_newest_loadable, refuse_foreign_checkpoints
from ssod.config import flatten
from ssod.masking import mask_secrets
from ssod.mlflow_client import tracking_errors
from ssod.run_state import RunState
from ssod.tracking import Tracker

log = logging.getLogger(__name__)


def find_resume(resume: Optional[str], ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume and its state, or (None, None) for a fresh run (which must
    not start among another run's checkpoints). ``auto`` takes the newest one that loads."""
    if resume == "auto":
        path, state = load_newest_loadable(ckpt_dir)
    else:
        path = find_resume_checkpoint(resume, ckpt_dir)
        state = load_checkpoint(path) if path else None
    if path is None:
        refuse_foreign_checkpoints(ckpt_dir)
    return path, state


def continue_schedule(initial: dict, optimizer: torch.optim.Optimizer, scheduler, train,
                      names: list[str]) -> RunState:
    """``train.init_continue``: the checkpoint's step, schedule position and EMA counters for a
    new run (its own MLflow run, no inherited bad files), and its SGD momentum for every
    parameter the checkpoint's optimizer held under the same name and shape.

    Matching by name treats every method alike: a supervised or Soft Teacher arm continuing a
    burn-in made with polishing networks carries the detector's momentum exactly as a
    Polishing Teacher arm does (parameters the checkpoint lacks start at zero momentum).
    ``names``: ``optimizer``'s parameters' names, in its order (``optimizer_parameter_names``).
    A checkpoint from before names were stored carries momentum only when its parameter list
    matches in count and shapes.
    """
    scheduler.load_state_dict(initial["scheduler"])
    saved_names = initial.get("optimizer_parameter_names")
    if saved_names is not None:
        carried = carry_momentum(initial["optimizer"], saved_names, optimizer, names)
        log.info("train.init_continue: SGD momentum carried for %d of %d parameters", carried, len(names))
    elif _same_parameters(initial["optimizer"], optimizer):
        optimizer.load_state_dict(initial["optimizer"])
    else:
        log.info("train.init_continue: the checkpoint's optimizer holds other parameters; momentum starts afresh")
    use_configured_rates(optimizer, scheduler, train)
    return RunState(step=initial["step"], ema_steps=initial["ema_steps"])


def carry_momentum(saved: dict, saved_names: list[str], optimizer: torch.optim.Optimizer, names: list[str]) -> int:
    """Copy the momentum buffers of an optimizer state dict (``saved``, its parameters named
    ``saved_names`` in order) into ``optimizer`` by parameter name, where shapes agree.
    Returns how many parameters received one."""
    indices = [index for group in saved["param_groups"] for index in group["params"]]
    buffers = {name: saved["state"].get(index, {}).get("momentum_buffer") for name, index in zip(saved_names, indices)}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    carried = 0
    for name, param in zip(names, params):
        buffer = buffers.get(name)
        if buffer is not None and buffer.shape == param.shape:
            optimizer.state[param]["momentum_buffer"] = buffer.detach().clone().to(param.device)
            carried += 1
    return carried


def _same_parameters(saved: dict, optimizer: torch.optim.Optimizer) -> bool:
    """Whether an optimizer state dict was made for ``optimizer``'s parameters (count and shapes)."""
    groups = [group["params"] for group in optimizer.param_groups]
    saved_groups = [group["params"] for group in saved["param_groups"]]
    if [len(g) for g in groups] != [len(g) for g in saved_groups]:
        return False
    for params, indices in zip(groups, saved_groups):
        for param, index in zip(params, indices):
            buffer = saved["state"].get(index, {}).get("momentum_buffer")
            if buffer is not None and buffer.shape != param.shape:
                return False
    return True


def use_configured_rates(optimizer: torch.optim.Optimizer, scheduler, train) -> None:
    """The config's learning rate, momentum and weight decay over a checkpoint's.

    A loaded optimizer and schedule carry the values they were made with, so a resume with
    another ``train.lr`` (going back after a divergence) would silently train on the old
    one. The schedule's position and the momentum buffers stay the checkpoint's; with an
    unchanged config every value is the same as before.
    """
    for group in optimizer.param_groups:
        group.update(initial_lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step


# How a run is started and named, not what it trains: a tuning retry changes them.
_NOT_COMPARED = ("train.resume", "train.run_name", "tracking.")


def log_resume(tracker: Tracker, cfg: DictConfig, step: int, checkpoint: Path) -> None:
    """A reopened run: the steps it resumed at (tag ``ssod.resumed_at_steps``), params it
    lacks, and what this resume's config changes, which MLflow params cannot show:
    ``resumes/step-<N>.json``, the config as ``resumes/step-<N>.yaml``, a warning, and the
    changed keys in tag ``ssod.changed_on_resume``."""
    steps = [part for part in tracker.previous_tags.get("ssod.resumed_at_steps", "").split(",") if part]
    tracker.set_tags({"ssod.resumed_at_steps": ",".join([*steps, str(step)])})
    try:
        changed = tracker.log_params({k: v for k, v in flatten(cfg).items() if not k.startswith(_NOT_COMPARED)})
    except tracking_errors() as error:  # the record of a resume must not stop it
        log.warning("MLflow: could not compare this resume's config with the run's params: %s", mask_secrets(str(error)))
        return
    name = f"resumes/step-{step:08d}"
    tracker.log_dict({"step": step, "checkpoint": str(checkpoint),
                      "changed": {key: {"logged": was, "now": now} for key, (was, now) in changed.items()}}, f"{name}.json")
    if changed:
        log.warning("resumed with a config that differs from the run's params (see %s.json): %s", name,
                    "; ".join(f"{key}: {was} -> {now}" for key, (was, now) in changed.items()))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"{name}.yaml")
        keys = {key for key in tracker.previous_tags.get("ssod.changed_on_resume", "").split(",") if key}
        tracker.set_tags({"ssod.changed_on_resume": ",".join(sorted(keys | set(changed)))})
