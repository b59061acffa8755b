"""One training iteration: the losses, then an optimizer and EMA step, or a skip.

Training (``ssod.training``) calls ``train_step`` once per iteration, and ``ssod-bench``
times it; ``Training`` holds what a run trains and checkpoints. ``train`` arguments are
the ``train`` config group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from omegaconf import DictConfig
from torch.profiler import record_function

from ssod.run_state import RunState, save_state
from ssod.losses import weighted_total
from ssod.methods import Method
from ssod.teaching import StepResult

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself with a checkpoint and a reason a person can act on (``ssod-train``
    prints it as one line, exit status 1)."""


class NonFiniteLossError(TrainingStopped):
    """Too many consecutive steps had a NaN or infinite loss."""


class LoaderWorkerDied(TrainingStopped):
    """A data loader worker process died (the out-of-memory killer, a signal)."""


@dataclass
class Training:
    """What a run trains and checkpoints; ``state`` is the part that survives a resume."""

    accelerator: Accelerator
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: RunState
    ckpt_dir: Path
    keep_checkpoints: int
    on_saved: Callable[[int], None] = lambda step: None  # called with the step of each checkpoint written
    # Plain values every checkpoint carries besides the weights: the resolved config and the
    # categories, so that a checkpoint alone says how to rebuild and read its model.
    describe: dict = field(default_factory=dict)

    def save(self) -> None:
        save_state(
            self.accelerator, self.ckpt_dir, self.state, self.student, self.teacher,
            self.optimizer, self.scheduler, self.keep_checkpoints, self.describe,
        )
        self.on_saved(self.state.step)


@dataclass
class StepFlags:
    """What every process learns from the step's all-reduce."""

    nonfinite: bool  # some process's loss was NaN or infinite: all skip the step
    stop: bool  # some process was sent SIGTERM / SIGINT: all checkpoint and stop
    bad_files: int  # distinct unreadable images met so far by all processes together


def train_step(training: Training, labeled: list, unlabeled: list, method: Method, weights: dict[str, float],
               train: DictConfig, stop_requested: Callable[[], bool] = lambda: False) -> tuple[StepResult, torch.Tensor, StepFlags]:
    """One training iteration: ``forward``, ``agree_on_flags`` and ``apply_step`` in order (the
    training loop, ``ssod-bench`` and tests call it). ``stop_requested()`` is asked after the
    forward pass."""
    result, total = forward(training, labeled, unlabeled, method, weights)
    flags = agree_on_flags(training, total, stop_requested())
    apply_step(training, result, total, flags, method, train)
    return result, total, flags


def forward(training: Training, labeled: list, unlabeled: list, method: Method,
            weights: dict[str, float]) -> tuple[StepResult, torch.Tensor]:
    """The method's losses on one batch (already on the device) and their weighted total."""
    training.student.train()
    with training.accelerator.autocast(), record_function("ssod::losses"):
        result = method.compute_losses(training.student, training.teacher, labeled, unlabeled)
        total = weighted_total(result.losses, weights)
    return result, total


def apply_step(training: Training, result: StepResult, total: torch.Tensor, flags: StepFlags, method: Method,
               train: DictConfig) -> None:
    """Backward, clip, optimizer, schedule and EMA, or a skip when any process's loss was not
    finite (``flags.nonfinite``). After ``train.max_consecutive_nonfinite`` skips in a row it
    saves a checkpoint and raises ``NonFiniteLossError``. ``train/grad_norm`` (before
    clipping) goes into ``result.stats``."""
    accelerator, state = training.accelerator, training.state
    if flags.nonfinite:
        _skip_step(training, train.max_consecutive_nonfinite)
        return
    state.consecutive_nonfinite = 0
    with record_function("ssod::backward"):
        accelerator.backward(total)
    with record_function("ssod::optimizer"):
        # The norm before clipping (train/grad_norm); without clipping, measured only.
        limit = train.grad_clip_norm or float("inf")
        result.stats["train/grad_norm"] = accelerator.clip_grad_norm_(training.student.parameters(), limit).detach()
        training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:
        # fp16: when the scaler skipped the step, neither schedule nor teacher moves.
        training.scheduler.step()
        with record_function("ssod::ema"):
            method.update_teacher(training.teacher, accelerator.unwrap_model(training.student), state.step,
                                  state.ema_steps, train.lr_steps)
            state.ema_steps += 1


def agree_on_flags(training: Training, total: torch.Tensor, stop_requested: bool) -> StepFlags:
    """What every process learns from one small all-reduce: whether any loss was not finite
    (all skip the step), whether any process was asked to stop (all checkpoint and stop), and
    how many distinct unreadable images all have met."""
    accelerator, state = training.accelerator, training.state
    # One small all-reduce decides, on every process together, whether to skip this step,
    # whether to stop, and whether any process met unreadable images it has not shared
    # yet. Its .tolist() is the step's one wait for the device in this loop (torchvision's
    # RPN and samplers have their own).
    unshared = len(state.bad_files) - state.shared_bad_files
    host_flags = torch.tensor([float(stop_requested), float(unshared)])
    local = torch.cat([(~torch.isfinite(total.detach())).float().reshape(1), host_flags.to(accelerator.device)])
    nonfinite, stop, new_bad = accelerator.reduce(local, reduction="sum").tolist()
    if new_bad > 0:
        _share_bad_files(state)
    return StepFlags(nonfinite > 0, stop > 0, len(state.bad_files))


def _share_bad_files(state: RunState) -> None:
    """Every process gets the union of all processes' unreadable files (in the same order).

    Counted per process and summed, a file every process meets (each pass reshuffles the
    shards) would count once per process, and the bad-image limit would shrink with the
    number of GPUs; and only the main process's list would reach the checkpoint.
    """
    lists = gather_object([state.bad_files])  # one list per process
    state.bad_files = list(dict.fromkeys(name for names in lists for name in names))
    state.shared_bad_files = len(state.bad_files)


def _skip_step(training: Training, max_consecutive: int) -> None:
    """Drop this step's gradients; give up, after a checkpoint, when it keeps happening."""
    state = training.state
    training.optimizer.zero_grad(set_to_none=True)
    state.nonfinite_steps += 1
    state.consecutive_nonfinite += 1
    log.warning("step %d: non-finite loss, step skipped (%d in a row)", state.step + 1, state.consecutive_nonfinite)
    if state.consecutive_nonfinite >= max_consecutive:
        training.save()
        raise NonFiniteLossError(
            f"{state.consecutive_nonfinite} consecutive steps with a non-finite loss at step {state.step + 1}; "
            f"checkpoint saved in {training.ckpt_dir}. Lower train.lr, or try mixed_precision=no."
        )


def to_device(batch: list, device: torch.device) -> list:
    """Move every tensor of a list of samples (tuples, dicts, Views) to ``device``."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if hasattr(value, "__dataclass_fields__"):
            return type(value)(**{k: move(getattr(value, k)) for k in value.__dataclass_fields__})
        return value

    return [move(sample) for sample in batch]


def forget_accelerator(accelerator: Accelerator) -> None:
    """Let the next Accelerator in this process (a test, a notebook, another run) choose its
    own mixed precision and device: accelerate keeps them process-wide unless reset (a
    private accelerate API). With several processes, PartialState (the process group) is kept."""
    AcceleratorState._reset_state(reset_partial_state=accelerator.num_processes == 1)
