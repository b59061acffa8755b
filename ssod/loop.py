"""What the training loop keeps between iterations: run state, meters, signals, checkpoints."""

from __future__ import annotations

import logging
import signal
from collections import deque
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ssod.checkpoint import rng_state, save_checkpoint
from ssod.data.coco import DatasetError
from ssod.data.transforms import project_boxes
from ssod.evaluation import PseudoLabelQuality
from ssod.visualize import pseudo_label_picture

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Counters that must survive a resume (stored in every checkpoint)."""

    step: int = 0
    ema_steps: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    run_id: str = ""
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
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "RunState":
        bad_files = list(state["bad_files"])
        return cls(
            state["step"], state["ema_steps"], state["nonfinite_steps"], state["consecutive_nonfinite"],
            state["mlflow_run_id"], bad_files, len(bad_files),
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
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        if accelerator.scaler is not None:
            payload["scaler"] = accelerator.scaler.state_dict()
        save_checkpoint(directory, state.step, payload, keep)
    accelerator.wait_for_everyone()


class Interrupts:
    """SIGTERM / SIGINT set a flag the loop checks each step (checkpoint, then KILLED).

    The first is acknowledged on the console at once; an evaluation under way is cut short
    (one process) or announced as the wait (several: they must finish it together). A second
    Ctrl-C raises KeyboardInterrupt at once; ``safe_to_save`` says whether the model is then
    in a consistent state (between steps, e.g. evaluating), so the run can still checkpoint.
    """

    def __init__(self) -> None:
        self.requested = False
        self.safe_to_save = False
        self.evaluating = False
        self._signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._signum = self._signum or signum
        where = "the evaluation" if self.evaluating else "this step"
        log.warning("%s received: stopping after %s with a checkpoint; Ctrl-C again stops at once",
                    signal.Signals(signum).name, where)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """Hand a stop request the run did not act on (it came after the last step's check)
        to the handler that was there before, if it is one of ours (not Python's default
        Ctrl-C handler): a tuning worker running trials in this process must still stop
        after this trial."""
        previous = self._previous.get(self._signum) if self.requested else None
        # Python's own Ctrl-C handler would raise KeyboardInterrupt over a finished run.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self._signum, None)


class Meters:
    """Interval averages of losses and statistics, and pseudo-label quality.

    Values stay tensors, and pseudo labels are only kept, until ``compute`` (once per log
    interval): the step itself does not wait for the device on their account.
    """

    def __init__(self, cls_threshold: float, class_names: tuple[str, ...]) -> None:
        self.cls_threshold = cls_threshold
        self.class_names = class_names
        self.quality = PseudoLabelQuality()
        # The last few unlabeled images, kept for the pictures logged at evaluation.
        self.recent: deque[dict] = deque(maxlen=8)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0
        self.pending: list[dict] = []
        self.quality.reset()

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def update(self, result, total: torch.Tensor, unlabeled: list, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            return
        self._add("train/loss", total)
        for name, value in result.losses.items():
            self._add(f"train/{name}", value)
        for name, value in result.stats.items():
            self._add(name, value)
        if result.teacher is not None:
            self._update_quality(result.teacher.pseudo_labels, unlabeled)

    def _update_quality(self, pseudo_labels, unlabeled: list) -> None:
        """Keep what pseudo-label quality needs; ``compute`` measures it (the step never waits)."""
        for labels, (weak, _, hidden) in zip(pseudo_labels, unlabeled):
            sample = {"pseudo": labels, "matrix": weak.matrix, "size": tuple(weak.image.shape[-2:]), "hidden": hidden}
            self.pending.append(sample)
            self.recent.append({**sample, "image": weak.image})

    def _measure_quality(self) -> None:
        """Compare pending pseudo labels (weak view) with the hidden ground truth projected into it."""
        for sample in self.pending:
            labels = sample["pseudo"]
            gt_boxes, gt_labels = hidden_ground_truth(sample)
            self.quality.update(labels, gt_boxes, gt_labels, self.cls_threshold)
        self.pending.clear()

    def compute(self) -> dict[str, float]:
        scalars = {name: (self.sums[name] / self.counts[name]).item() for name in self.sums}
        scalars["train/skipped_steps_interval"] = float(self.skipped)
        self._measure_quality()
        quality = self.quality.compute()
        if quality.get("pseudo/images", 0):
            scalars.update(quality)
        self.reset()
        return scalars


def hidden_ground_truth(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden ground truth of an unlabeled image, projected into its weak view."""
    height, width = sample["size"]
    hidden = sample["hidden"]
    boxes, keep = project_boxes(hidden["boxes"], sample["matrix"], width, height)
    return boxes, hidden["labels"][keep]


def log_pictures(tracker, recent, class_names: tuple[str, ...], step: int, limit: int) -> None:
    """Ground truth | raw pseudo labels | polished pseudo labels of the last ``limit`` unlabeled images."""
    for index, sample in enumerate(list(recent)[-limit:] if limit > 0 else []):
        pseudo = sample["pseudo"]
        kept = pseudo.cls_keep
        picture = pseudo_label_picture(
            sample["image"], *hidden_ground_truth(sample), pseudo.boxes, pseudo.labels,
            pseudo.reg_boxes[kept], pseudo.cls_labels[kept], class_names,
        )
        tracker.log_image(picture, f"pseudo_labels/step_{step:08d}_{index}.png")
