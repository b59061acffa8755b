"""The counters a run keeps across resumes, and the checkpoint that stores them.

``RunState`` is stored in every checkpoint (``save_state``); the unreadable images met so far
are part of it, and past ``data.max_bad_image_fraction`` of the data they stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssod.checkpoint import rng_state, save_checkpoint
from ssod.data.coco import DatasetError


@dataclass
class RunState:
    """Counters that must survive a resume (stored in every checkpoint)."""

    step: int = 0
    ema_steps: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    run_id: str = ""
    # The best value of train.best_metric so far and its step (checkpoints/best.pt).
    best_value: Optional[float] = None
    best_step: int = 0
    # Unreadable images met by any process (the same on all, once shared; see ssod.step).
    bad_files: list[str] = field(default_factory=list)
    # How many of ``bad_files`` all processes already share (not saved: a checkpoint holds
    # the shared list, so after a resume all of it is shared).
    shared_bad_files: int = 0

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ema_steps": self.ema_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "mlflow_run_id": self.run_id,
            "bad_files": list(self.bad_files),
            "best_value": self.best_value,
            "best_step": self.best_step,
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "RunState":
        bad_files = list(state["bad_files"])
        return cls(
            state["step"], state["ema_steps"], state["nonfinite_steps"], state["consecutive_nonfinite"],
            state["mlflow_run_id"], state.get("best_value"), state.get("best_step", 0),  # none before best.pt
            bad_files, len(bad_files),
        )

    def note_bad_files(self, metas: list[dict]) -> None:
        for meta in metas:
            for bad in meta.get("bad_files", ()):
                if bad not in self.bad_files:
                    self.bad_files.append(bad)


def stop_if_too_many_bad(state: RunState, data, max_fraction: float, tracker, all_bad: int) -> None:
    """Corrupt images are skipped, but past ``max_fraction`` of the data the run stops.

    ``all_bad`` is the count of distinct files all processes met (the same on every
    process), so every process stops together.
    """
    total = len(data.labeled) + (len(data.unlabeled) if data.unlabeled is not None else 0)
    if all_bad and all_bad > max_fraction * total:
        log_bad_files(tracker, state.bad_files, already_logged=0)
        raise DatasetError(
            f"{all_bad} of {total} training images could not be read "
            f"(more than data.max_bad_image_fraction={max_fraction}); first: {(state.bad_files or ['on another process'])[0]}"
        )


def log_bad_files(tracker, bad_files: list[str], already_logged: int) -> int:
    """Replace the ``bad_images.txt`` artifact when new unreadable images were met; returns the count."""
    if len(bad_files) > already_logged:
        tracker.log_text("\n".join(bad_files) + "\n", "bad_images.txt")
    return len(bad_files)


def optimizer_parameter_names(model: Any, optimizer: Any) -> list[str]:
    """The names (``model.named_parameters()``) of ``optimizer``'s parameters, in its order."""
    name_of = {id(param): name for name, param in model.named_parameters()}
    return [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]


def save_state(accelerator, directory: Path, state: RunState, student, teacher, optimizer, scheduler, keep: int,
               describe: Optional[dict] = None) -> None:
    """Write a checkpoint from the main process; every process waits for it. ``describe``:
    plain values stored beside the weights (``config``, ``categories``)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {
            **(describe or {}),
            **state.to_checkpoint(),
            "student": accelerator.unwrap_model(student).state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            # What train.init_continue matches momentum by (another method's model may hold
            # other parameters, e.g. no polishing networks).
            "optimizer_parameter_names": optimizer_parameter_names(accelerator.unwrap_model(student), optimizer),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        if accelerator.scaler is not None:
            payload["scaler"] = accelerator.scaler.state_dict()
        save_checkpoint(directory, state.step, payload, keep)
    accelerator.wait_for_everyone()
