"""Train a detector: supervised, Soft Teacher or Polishing Teacher.

Run it from the project directory (where ``mlflow.db`` lives)::

    ssod-train                                   # built-in synthetic data, CPU or 1 GPU
    accelerate launch -m ssod.train experiment=synthetic method=polish_teacher
    accelerate launch --multi_gpu --num_processes 8 -m ssod.train experiment=coco_partial data.percent=10
    ssod-train train.resume=auto                 # continue the newest complete checkpoint

``main`` only calls ``run(cfg)``; tests and ``ssod.tune`` call ``run`` directly. ``run``
builds everything in plain sight, loops over iterations and returns the final metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig, OmegaConf

from ssod.build import apply_speed_settings, build_loss_weights, build_model, build_optimizer, build_scheduler
from ssod.checkpoint import find_resume_checkpoint, load_checkpoint, load_weights, set_rng_state
from ssod.config import CONF_DIR, eval_workers, flatten
from ssod.data.pipeline import build_data
from ssod.data.sampling import infinite_loader
from ssod.engine import compute_losses, eval_loader, evaluate, shard
from ssod.loop import Interrupts, Meters, RunState, log_bad_files, log_pictures, save_state, stop_if_too_many_bad
from ssod.losses import weighted_total
from ssod.models.teacher import ema_momentum, ema_update
from ssod.tracking import Tracker, default_tracking_uri

log = logging.getLogger(__name__)

EvalCallback = Callable[[int, dict[str, float]], None]


class RunResult(dict):
    """Final metrics by name; ``status`` says how the run ended (FINISHED or KILLED)."""

    status = "FINISHED"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


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


def run(cfg: DictConfig, on_eval: Optional[EvalCallback] = None) -> dict[str, float]:
    """Train with ``cfg`` and return the final metrics (``val/teacher/bbox_AP``, ...).

    ``on_eval(step, metrics)`` is called on the main process after every evaluation; it
    may raise (e.g. ``optuna.TrialPruned``) to stop training, which ends the MLflow run
    KILLED after a checkpoint.
    """
    method = OmegaConf.to_object(cfg.method)
    train = cfg.train
    project_dir = Path.cwd()
    output_dir = Path(train.output_dir).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else project_dir / output_dir
    ckpt_dir = output_dir / "checkpoints"
    # Several processes (torchrun) on a machine without CUDA: accelerate sets up gloo data
    # parallelism only when told cpu=True; otherwise every process trains alone as rank 0,
    # each with its own MLflow run.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Before accelerate's process-wide state exists: a missing or refused checkpoint must not
    # leave it set (the ``finally`` below resets it, and a failed resume never gets there).
    resume_path = find_resume_checkpoint(train.resume, ckpt_dir)
    resumed = load_checkpoint(resume_path) if resume_path else None
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        cpu=train.cpu or multi_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(train.seed)
    uri = cfg.tracking.uri or default_tracking_uri(project_dir)
    tracker = Tracker(uri, cfg.tracking.experiment, enabled=accelerator.is_main_process and cfg.tracking.enabled)
    state = RunState()
    interrupts = Interrupts()
    status = "FAILED"
    try:
        with accelerator.main_process_first():
            data = build_data(cfg.data, project_dir, need_unlabeled=method.name != "supervised")
        student = apply_speed_settings(train, build_model(cfg.model, method, data.category_map.num_classes))
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
        optimizer = build_optimizer(train, student)
        scheduler = build_scheduler(train, optimizer)
        weights = build_loss_weights(method)
        if train.init_from and not resumed:
            initial = load_checkpoint(find_resume_checkpoint(train.init_from, ckpt_dir))
            load_weights(student, initial["student"])
            load_weights(teacher, initial["teacher"])
            log.info("initialised from %s (step %d)", train.init_from, initial["step"])
        if resumed:
            student.load_state_dict(resumed["student"])
            teacher.load_state_dict(resumed["teacher"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            state = RunState.from_checkpoint(resumed)
            log.info("resuming from %s at step %d", resume_path, state.step)
        student, optimizer = accelerator.prepare(student, optimizer)
        if resumed and accelerator.scaler is not None and "scaler" in resumed:
            accelerator.scaler.load_state_dict(resumed["scaler"])
        teacher.to(accelerator.device)
        state.run_id = tracker.start(
            train.run_name, dict(cfg.tracking.tags), cfg.tracking.parent_run_id, run_id=state.run_id
        )
        if not resumed:
            _log_run_inputs(tracker, cfg, data)
        rank, world = accelerator.process_index, accelerator.num_processes
        workers = cfg.data.num_workers
        pin = accelerator.device.type == "cuda"
        labeled_iter = infinite_loader(data.labeled, train.batch_labeled, train.seed, rank, world, state.step, workers, pin)
        unlabeled_iter = None
        if data.unlabeled is not None:
            unlabeled_iter = infinite_loader(data.unlabeled, train.batch_unlabeled, train.seed + 1, rank, world, state.step, workers, pin)
        val_workers = eval_workers(cfg.data, accelerator.device)
        val_loader = eval_loader(data.val, shard(data.val, accelerator), num_workers=val_workers, pin_memory=pin)
        if resumed:
            set_rng_state(resumed["rng"])  # after the loaders: creating them draws from the RNG
        meters = Meters(method, data.category_map.names)
        progress = _progress(accelerator, train, state.step)
        final_metrics = RunResult()
        interval_start, interval_step = time.perf_counter(), state.step
        bad_files_logged = 0
        if state.step >= train.iterations:
            # Resumed from the final checkpoint (a retried trial, a requeued job): nothing to
            # train, but the caller and final_metrics.json still get the final evaluation.
            final_metrics.update(_evaluate_both(accelerator, student, teacher, val_loader))

        for step in range(state.step, train.iterations):
            labeled, labeled_meta = next(labeled_iter)
            unlabeled, unlabeled_meta = next(unlabeled_iter) if unlabeled_iter is not None else ([], [])
            state.note_bad_files(labeled_meta + unlabeled_meta)
            labeled = to_device(labeled, accelerator.device)
            unlabeled = to_device(unlabeled, accelerator.device)
            student.train()
            with accelerator.autocast():
                result = compute_losses(student, teacher, labeled, unlabeled, method)
                total = weighted_total(result.losses, weights)
            # One small all-reduce decides, on every process together, whether to skip this
            # step (non-finite loss anywhere), whether to stop (a signal anywhere), and how
            # many unreadable images all processes have met. Its .tolist() is the step's one
            # wait for the device in this loop (torchvision's RPN and samplers have their own).
            host_flags = torch.tensor([float(interrupts.requested), float(len(state.bad_files))])
            local = torch.cat([(~torch.isfinite(total.detach())).float().reshape(1), host_flags.to(accelerator.device)])
            flags = accelerator.reduce(local, reduction="sum").tolist()
            stop_if_too_many_bad(state, data, cfg.data.max_bad_image_fraction, tracker, int(flags[2]))
            if flags[0] > 0:
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= train.max_consecutive_nonfinite:
                    state.step = step
                    save_state(accelerator, ckpt_dir, state, student, teacher, optimizer, scheduler, train.keep_checkpoints)
                    raise NonFiniteLossError(
                        f"{state.consecutive_nonfinite} consecutive steps with a non-finite loss at step {step + 1}; "
                        f"checkpoint saved in {ckpt_dir}. Lower train.lr, or try mixed_precision=no."
                    )
            else:
                state.consecutive_nonfinite = 0
                accelerator.backward(total)
                if train.grad_clip_norm:
                    accelerator.clip_grad_norm_(student.parameters(), train.grad_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not accelerator.optimizer_step_was_skipped:
                    # fp16: when the scaler skipped the step, neither schedule nor teacher moves.
                    scheduler.step()
                    _update_teacher(teacher, accelerator.unwrap_model(student), method, train, state)
            state.step = step + 1
            meters.update(result, total, unlabeled, flags[0] > 0)
            if progress is not None:
                progress.update(1)

            if state.step % train.log_every == 0 or state.step == train.iterations:
                scalars = meters.compute()
                seconds = (time.perf_counter() - interval_start) / max(state.step - interval_step, 1)
                scalars.update(_schedule_scalars(optimizer, state, method, seconds))
                tracker.log_metrics(scalars, state.step)
                if progress is not None:  # the interval's mean loss: no extra wait for the device per step
                    progress.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.3f}", refresh=False)
                bad_files_logged = log_bad_files(tracker, state.bad_files, bad_files_logged)
                final_metrics.update(scalars)
                interval_start, interval_step = time.perf_counter(), state.step
            if state.step % train.eval_every == 0 or state.step == train.iterations:
                metrics = _evaluate_both(accelerator, student, teacher, val_loader)
                if accelerator.is_main_process:
                    tracker.log_metrics(metrics, state.step)
                    log_pictures(tracker, meters.recent, data.category_map.names, state.step, train.num_vis_images)
                    final_metrics.update(metrics)
                    if on_eval is not None:
                        on_eval(state.step, metrics)
            if state.step % train.ckpt_every == 0 or state.step == train.iterations:
                save_state(accelerator, ckpt_dir, state, student, teacher, optimizer, scheduler, train.keep_checkpoints)
            if flags[1] > 0:
                save_state(accelerator, ckpt_dir, state, student, teacher, optimizer, scheduler, train.keep_checkpoints)
                log.warning("stop requested: checkpoint saved at step %d", state.step)
                status = "KILLED"
                break
        else:
            status = "FINISHED"
        if progress is not None:
            progress.close()
        if accelerator.is_main_process and status == "FINISHED":
            _log_run_outputs(tracker, final_metrics, ckpt_dir / f"step-{state.step:08d}.pt", cfg.tracking.log_checkpoint_artifact)
        final_metrics.status = status
        return final_metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        if _is_prune(error):
            status = "KILLED"
            save_state(accelerator, ckpt_dir, state, student, teacher, optimizer, scheduler, train.keep_checkpoints)
        raise
    finally:
        interrupts.restore()
        tracker.end(status)
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        # The next run in this process (a test, a notebook) may ask for another mixed
        # precision: accelerate keeps it process-wide unless reset (a private accelerate
        # API; the process group, in PartialState, is kept).
        AcceleratorState._reset_state()


def _log_run_inputs(tracker: Tracker, cfg: DictConfig, data) -> None:
    """Flattened params, the resolved config, and the json files read (a new run only)."""
    tracker.log_params(flatten(cfg))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    unlabeled_json = data.files.unlabeled_json if data.unlabeled is not None else None  # supervised: unused
    for context, path in (("train", data.files.train_json), ("unlabeled", unlabeled_json), ("eval", data.files.val_json)):
        if path is not None:
            tracker.log_dataset(path, name=Path(path).name, context=context)


def _schedule_scalars(optimizer, state: RunState, method, seconds_per_iter: float) -> dict[str, float]:
    """Per-interval scalars of the schedule and of the faults met so far."""
    last_ema_step = max(state.ema_steps - 1, 0)
    return {
        "train/sec_per_iter": seconds_per_iter,
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/nonfinite_steps": state.nonfinite_steps,
        "train/bad_images": len(state.bad_files),
        "train/ema_momentum": ema_momentum(last_ema_step, method.ema_momentum),
        "train/polish_ema_momentum": ema_momentum(last_ema_step, method.polish_ema_momentum, method.polish_ema_warmup),
        "train/unsup_weight": method.unsup_weight,
    }


def _log_run_outputs(tracker: Tracker, final_metrics: dict, final_checkpoint: Path, log_checkpoint: bool) -> None:
    """``final_metrics.json`` and, when asked, the final checkpoint as artifacts."""
    tracker.log_dict(final_metrics, "final_metrics.json")
    if log_checkpoint and final_checkpoint.is_file():
        tracker.log_artifact(final_checkpoint, "checkpoints")


def _is_prune(error: BaseException) -> bool:
    return type(error).__name__ == "TrialPruned"


def _update_teacher(teacher, student, method, train, state: RunState) -> None:
    """EMA step for the detector and the polishing networks (after a real optimizer step)."""
    frozen = method.ema_freeze_after_first_lr_step and train.lr_steps and state.step + 1 > min(train.lr_steps)
    if not frozen:
        momentum = ema_momentum(state.ema_steps, method.ema_momentum)
        ema_update(teacher.detector, student.detector, momentum, method.ema_include_buffers)
        if student.polisher is not None:
            polish_momentum = ema_momentum(state.ema_steps, method.polish_ema_momentum, method.polish_ema_warmup)
            ema_update(teacher.polisher, student.polisher, polish_momentum, method.ema_include_buffers)
    state.ema_steps += 1


def _evaluate_both(accelerator, student, teacher, val_loader) -> dict[str, float]:
    """``val/teacher/bbox_*`` and ``val/student/bbox_*`` (main process; empty elsewhere)."""
    metrics: dict[str, float] = {}
    for name, detector in (("teacher", teacher.detector), ("student", accelerator.unwrap_model(student).detector)):
        result = evaluate(detector, val_loader, accelerator)
        if result is not None:
            metrics.update({f"val/{name}/bbox_{key}": value for key, value in result.items()})
    return metrics


def _progress(accelerator, train, start: int):
    if not (train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=train.iterations, initial=start, desc="train", dynamic_ncols=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    """Console entry point (``ssod-train``); returns the teacher AP for Hydra sweepers."""
    metrics = run(cfg)
    if metrics.status == "KILLED":
        # Stopped by a signal after a checkpoint: not a success for the job scheduler.
        sys.exit(128 + signal.SIGTERM)
    value = metrics.get("val/teacher/bbox_AP")
    return None if value is None or math.isnan(value) else value


if __name__ == "__main__":
    main()
