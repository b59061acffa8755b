"""Training, as a library: ``run(cfg)`` trains a detector with the method ``cfg.method`` names.

``ssod-train`` (``ssod.train``) and the tuner (``ssod.tuning``) call ``run``. It builds
everything in plain sight, ``_train_loop`` iterates (one ``ssod.step.train_step`` each, then
logging, evaluation and checkpoints at their intervals), and ``run`` returns the final metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ssod.build import apply_speed_settings, build_optimizer, build_scheduler
from ssod.checkpoint import (
    DirectoryLock,
    checkpoint_file,
    find_resume_checkpoint,
    is_in_folder,
    list_checkpoints,
    load_checkpoint,
    load_newest_loadable,
    load_weights,
    refuse_foreign_checkpoints,
    set_aside_other_checkpoints,
    set_rng_state,
)
from ssod.config import eval_workers, flatten, validate
from ssod.data.pipeline import DataBundle, build_data
from ssod.data.sampling import infinite_loader
from ssod.data.splits import write_json_atomic
from ssod.inference import EvaluationInterrupted, eval_loader, evaluate, shard
from ssod.loop import Interrupts, Meters, RunState, log_bad_files, log_pictures, stop_if_too_many_bad
from ssod.methods import Method, build_method
from ssod.models.teacher import ema_momentum
from ssod.step import Training, forget_accelerator, to_device, train_step
from ssod.tracking import (
    SPOOL_DIR,
    Tracker,
    check_reachable,
    default_tracking_uri,
    mask_secrets,
    provenance_tags,
    tracking_errors,
)

log = logging.getLogger(__name__)

EvalCallback = Callable[[int, dict[str, float]], None]


class RunResult(dict):
    """Final metrics by name; ``status`` says how the run ended (FINISHED or KILLED);
    ``tracking_incomplete``: MLflow did not take all of it (see ``Tracker.end``)."""

    status = "FINISHED"
    tracking_incomplete = False


# ssod-train's exit status when training finished but MLflow did not take all of the run.
TRACKING_INCOMPLETE_STATUS = 3


@dataclass
class Loaders:
    """Endless training batches (``unlabeled`` is None when supervised) and the validation loader."""

    labeled: Iterator
    unlabeled: Optional[Iterator]
    val: DataLoader


def run(cfg: DictConfig, on_eval: Optional[EvalCallback] = None) -> dict[str, float]:
    """Train with ``cfg`` and return the final metrics (``val/teacher/bbox_AP``, ...).

    ``on_eval(step, metrics)`` is called on the main process after every evaluation; it
    may raise (e.g. ``optuna.TrialPruned``) to stop training, which ends the MLflow run
    KILLED after a checkpoint.
    """
    validate(cfg)  # before anything is created: no MLflow run, no output folder
    method = build_method(OmegaConf.to_object(cfg.method))
    train = cfg.train
    project_dir = Path.cwd()
    output_dir = Path(train.output_dir).expanduser()
    ckpt_dir = (output_dir if output_dir.is_absolute() else project_dir / output_dir) / "checkpoints"
    uri = cfg.tracking.uri or default_tracking_uri(project_dir)
    first_process = int(os.environ.get("RANK", "0")) == 0
    if first_process and cfg.tracking.enabled:
        check_reachable(uri)  # seconds, not minutes of MLflow's retries
    # Before accelerate's process-wide state exists: a missing or refused checkpoint must not
    # leave it set (the ``finally`` below resets it, and a failed resume never gets there).
    # The first process locks the folder first: a second training into it stops here.
    lock = DirectoryLock(ckpt_dir) if first_process else None
    try:
        resume_path, resumed = _find_resume(train.resume, ckpt_dir)
        accelerator = _accelerator(train)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    set_seed(train.seed)
    tracker = Tracker(uri, cfg.tracking.experiment, enabled=accelerator.is_main_process and cfg.tracking.enabled,
                      spool_dir=ckpt_dir.parent / SPOOL_DIR)
    interrupts = Interrupts()
    status, training, final_metrics = "FAILED", None, None
    try:
        with accelerator.main_process_first():
            data = build_data(cfg.data, project_dir, need_unlabeled=method.needs_unlabeled)
        tags = dict(cfg.tracking.tags)
        if method.oracle:
            _check_oracle(data)
            tags["ssod.oracle"] = "true"
        training = _build_training(cfg, method, data.category_map.num_classes, accelerator, ckpt_dir, resumed)
        training.describe = describe_run(cfg, data.category_map)
        if accelerator.is_main_process:  # beside the checkpoints, for a person to read
            (ckpt_dir.parent / "config.yaml").write_text(OmegaConf.to_yaml(training.describe["config"]))
        if resumed:
            log.info("resuming from %s at step %d", resume_path, training.state.step)
        # A resume from before a checkpoint the run already saved (train.resume=<file>, going
        # back) continues in a new MLflow run (see Tracker.start), and only once that and the
        # model are set up are the folder's later checkpoints set aside. The folder's
        # checkpoints tell how far the run went only if the resumed one is of it.
        on_disk = list_checkpoints(ckpt_dir) if resumed and is_in_folder(resume_path, ckpt_dir) else []
        training.state.run_id = tracker.start(
            train.run_name, tags, cfg.tracking.parent_run_id, run_id=training.state.run_id,
            resume_step=training.state.step if resumed else None, saved_step=on_disk[-1][0] if on_disk else 0,
            new_run_tags=_run_context(accelerator) if tracker.enabled else {},
        )
        if tracker.run_id:
            log.info("MLflow run %s (experiment %s) in %s", tracker.run_id, cfg.tracking.experiment, mask_secrets(uri))
        if resumed and train.resume != "auto" and accelerator.is_main_process:
            set_aside_other_checkpoints(ckpt_dir, resume_path, training.state.step)
        training.on_saved = tracker.note_checkpoint
        for context, dataset in _data_sets(data):
            log.info("%s set: %d images, %d boxes; %d degenerate boxes dropped (%s)", context, len(dataset),
                     dataset.box_count, dataset.degenerate_boxes, dataset.coco.source_path)
        if not resumed or tracker.branched_from:
            _log_run_inputs(tracker, cfg, data)
        else:
            _log_resume(tracker, cfg, training.state.step, resume_path)
        loaders = _build_loaders(cfg, data, accelerator, training.state.step)
        if resumed:
            set_rng_state(resumed["rng"])  # after the loaders: creating them draws from the RNG
        final_metrics = _train_loop(cfg, method, data, training, loaders, tracker, interrupts, on_eval)
        status = final_metrics.status
        if status == "FINISHED" and data.test is not None:
            final_metrics.update(_evaluate_test(cfg, data, training, tracker))
        if accelerator.is_main_process and status == "FINISHED":
            final_checkpoint = ckpt_dir / f"step-{training.state.step:08d}.pt"
            _log_run_outputs(tracker, final_metrics, final_checkpoint, cfg.tracking.log_checkpoint_artifact)
            # Beside the checkpoints as well: readable with tracking off (a benchmark on a GPU machine).
            write_json_atomic({**final_metrics, "step": training.state.step, "mlflow_run_id": tracker.run_id or None},
                              ckpt_dir.parent / "final_metrics.json")
            # AP in percent, as papers and this README print it (MLflow holds pycocotools' 0-1 values).
            log.info("finished at step %d: teacher AP %.1f, student AP %.1f (COCO AP in %%, validation set); checkpoint %s",
                     training.state.step, 100 * final_metrics.get("val/teacher/bbox_AP", math.nan),
                     100 * final_metrics.get("val/student/bbox_AP", math.nan), final_checkpoint)
            if data.test is not None:
                log.info("held-out test set: teacher AP %.1f, student AP %.1f (COCO AP in %%)",
                         100 * final_metrics.get("test/teacher/bbox_AP", math.nan),
                         100 * final_metrics.get("test/student/bbox_AP", math.nan))
        return final_metrics
    except KeyboardInterrupt:
        status = "KILLED"
        if interrupts.safe_to_save and training is not None:
            # A second Ctrl-C between steps (evaluating): the weights are whole, keep them.
            training.save()
            log.warning("stopped at once: checkpoint saved at step %d", training.state.step)
        raise
    except BaseException as error:
        if _is_prune(error) and training is not None:
            status = "KILLED"
            training.save()
        raise
    finally:
        interrupts.restore()
        tracker.end(status)
        if tracker.spooled is not None:
            # The last line a user sees: the run is not fully in MLflow yet.
            if final_metrics is not None:
                final_metrics.tracking_incomplete = True
            log.error("tracking incomplete: the MLflow server did not take the run's last metric values and its end "
                      "(%s); they are kept in %s and sent by the next run in this folder or by `ssod-sync %s`",
                      status, tracker.spooled, ckpt_dir.parent)
        if lock is not None:
            lock.release()
        if status != "FAILED":
            # Not after an error: it may have struck this process alone, while the others
            # wait in a collective of the step for it; waiting for them too would hang the
            # job, where exiting lets the launcher (torchrun) stop them all.
            accelerator.wait_for_everyone()
        accelerator.free_memory()
        forget_accelerator(accelerator)
        if status != "KILLED":
            interrupts.pass_on()


def _train_loop(cfg: DictConfig, method: Method, data: DataBundle, training: Training, loaders: Loaders,
                tracker: Tracker, interrupts: Interrupts, on_eval: Optional[EvalCallback]) -> RunResult:
    """Iterate from ``training.state.step`` to ``train.iterations``: step, log, evaluate, checkpoint."""
    train, accelerator, state = cfg.train, training.accelerator, training.state
    meters = Meters(method.thresholds.cls, data.category_map.names)
    progress = _progress(accelerator, train, state.step)
    final_metrics = RunResult(data_counts(data))  # what the run read, in final_metrics.json too
    interval_start, interval_step = time.perf_counter(), state.step
    bad_files_logged = 0
    if state.step >= train.iterations:
        # Resumed from the final checkpoint (a retried trial, a requeued job): nothing to
        # train, but the run (what it lacks of it), final_metrics.json and ``on_eval`` (a
        # tuning trial completes on it) still get the final evaluation. The training
        # scalars of final_metrics.json are those the run already has.
        metrics = _evaluate_both(training, loaders.val)
        if accelerator.is_main_process:
            tracker.log_metrics(metrics, state.step)
            final_metrics.update(tracker.previous_metrics)
            final_metrics.update(metrics)
            if on_eval is not None:
                on_eval(state.step, metrics)

    for step in range(state.step, train.iterations):
        labeled, labeled_meta = next(loaders.labeled)
        # During the burn-in (method.unsup_start) no unlabeled batch is drawn: a supervised step.
        semi = loaders.unlabeled is not None and method.semi_supervised_at(step)
        unlabeled, unlabeled_meta = next(loaders.unlabeled) if semi else ([], [])
        state.note_bad_files(labeled_meta + unlabeled_meta)
        labeled = to_device(labeled, accelerator.device)
        unlabeled = to_device(unlabeled, accelerator.device)
        result, total, flags = train_step(
            training, labeled, unlabeled, method, method.loss_weights(step), train, lambda: interrupts.requested,
            on_flags=lambda flags: stop_if_too_many_bad(state, data, cfg.data.max_bad_image_fraction, tracker, flags.bad_files),
        )
        state.step = step + 1
        meters.update(result, total, unlabeled, flags.nonfinite)
        if progress is not None:
            progress.update(1)

        # A stop logs the interval it cuts short: the resumed run starts a new one there.
        if state.step % train.log_every == 0 or state.step == train.iterations or flags.stop:
            scalars = meters.compute()
            seconds = (time.perf_counter() - interval_start) / max(state.step - interval_step, 1)
            scalars.update(_schedule_scalars(training.optimizer, state, method, seconds))
            tracker.log_metrics(scalars, state.step)
            if progress is not None:  # the interval's mean loss: no extra wait for the device per step
                progress.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.3f}", refresh=False)
            bad_files_logged = log_bad_files(tracker, state.bad_files, bad_files_logged)
            final_metrics.update(scalars)
            interval_start, interval_step = time.perf_counter(), state.step
        # Evaluations and checkpoints are not training time: train/sec_per_iter leaves them out.
        paused = time.perf_counter()
        if (state.step % train.eval_every == 0 or state.step == train.iterations) and not flags.stop:
            interrupts.evaluating = interrupts.safe_to_save = True
            try:
                metrics = _evaluate_both(training, loaders.val, interrupts)
            except EvaluationInterrupted:
                log.warning("the evaluation at step %d was cut short by the stop request: not logged", state.step)
                metrics, flags.stop = None, True
            # Not in a ``finally``: a second Ctrl-C (KeyboardInterrupt) leaves it set for ``run``.
            interrupts.evaluating = interrupts.safe_to_save = False
        else:
            metrics = None
        if metrics is not None:
            if accelerator.is_main_process:
                metrics["val/seconds"] = time.perf_counter() - paused
                tracker.log_metrics(metrics, state.step)
                log_pictures(tracker, meters.recent, data.category_map.names, state.step, train.num_vis_images)
                final_metrics.update(metrics)
                if on_eval is not None:
                    on_eval(state.step, metrics)
        if state.step % train.ckpt_every == 0 or state.step == train.iterations or flags.stop:
            training.save()
        interval_start += time.perf_counter() - paused
        if flags.stop:
            log.warning("stop requested: checkpoint saved at step %d", state.step)
            final_metrics.status = "KILLED"
            break
    if progress is not None:
        progress.close()
    return final_metrics


def _find_resume(resume: Optional[str], ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
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


def _accelerator(train) -> Accelerator:
    # Several processes (torchrun) on a machine without CUDA: accelerate sets up gloo data
    # parallelism only when told cpu=True; otherwise every process trains alone as rank 0,
    # each with its own MLflow run.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=train.mixed_precision,
        cpu=train.cpu or multi_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _build_training(cfg: DictConfig, method: Method, num_classes: int, accelerator: Accelerator, ckpt_dir: Path,
                    resumed: Optional[dict]) -> Training:
    """Student, EMA teacher, optimizer and schedule: fresh, initialised (``train.init_from``) or resumed."""
    train = cfg.train
    student = apply_speed_settings(train, method.build_model(cfg.model, num_classes))
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    optimizer = build_optimizer(train, student)
    scheduler = build_scheduler(train, optimizer)
    state = RunState()
    if train.init_from and not resumed:
        initial = load_checkpoint(checkpoint_file(train.init_from, "train.init_from"))
        load_weights(student, initial["student"])
        load_weights(teacher, initial["teacher"])
        if train.init_continue:
            state = _continue_schedule(initial, optimizer, scheduler, train)
        log.info("initialised from %s (step %d)%s", train.init_from, initial["step"],
                 ", continuing its schedule" if train.init_continue else "")
    if resumed:
        student.load_state_dict(resumed["student"])
        teacher.load_state_dict(resumed["teacher"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        _use_configured_rates(optimizer, scheduler, train)
        state = RunState.from_checkpoint(resumed)
    student, optimizer = accelerator.prepare(student, optimizer)
    if resumed and accelerator.scaler is not None and "scaler" in resumed:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    teacher.to(accelerator.device)
    return Training(accelerator, student, teacher, optimizer, scheduler, state, ckpt_dir, train.keep_checkpoints)


def _continue_schedule(initial: dict, optimizer: torch.optim.Optimizer, scheduler, train) -> RunState:
    """``train.init_continue``: the checkpoint's step, schedule position and EMA counters for a
    new run (its own MLflow run, no inherited bad files), and its SGD momentum when it was
    made for the same parameters (another method's model, e.g. with polishing networks, starts
    its momentum afresh: said in the log)."""
    scheduler.load_state_dict(initial["scheduler"])
    if _same_parameters(initial["optimizer"], optimizer):
        optimizer.load_state_dict(initial["optimizer"])
    else:
        log.info("train.init_continue: the checkpoint's optimizer holds other parameters; momentum starts afresh")
    _use_configured_rates(optimizer, scheduler, train)
    return RunState(step=initial["step"], ema_steps=initial["ema_steps"])


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


def _use_configured_rates(optimizer: torch.optim.Optimizer, scheduler, train) -> None:
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


def _build_loaders(cfg: DictConfig, data: DataBundle, accelerator: Accelerator, step: int) -> Loaders:
    """This process's shard of the training streams, from ``step`` on, and of the validation set."""
    train, workers = cfg.train, cfg.data.num_workers
    rank, world = accelerator.process_index, accelerator.num_processes
    pin = accelerator.device.type == "cuda"
    labeled = infinite_loader(data.labeled, train.batch_labeled, train.seed, rank, world, step, workers, pin)
    unlabeled = None
    if data.unlabeled is not None:
        # The unlabeled stream starts after the burn-in: its position is the steps since then.
        unlabeled_step = max(step - cfg.method.unsup_start, 0)
        unlabeled = infinite_loader(data.unlabeled, train.batch_unlabeled, train.seed + 1, rank, world, unlabeled_step,
                                    workers, pin)
    val_workers = eval_workers(cfg.data, accelerator.device)
    val = eval_loader(data.val, shard(data.val, accelerator), num_workers=val_workers, pin_memory=pin)
    return Loaders(labeled, unlabeled, val)


def describe_run(cfg: DictConfig, categories) -> dict:
    """What a checkpoint carries to be used alone: ``config`` (resolved; as given where an
    interpolation only Hydra's app resolves) and ``categories`` (COCO ids and names, label order)."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside Hydra's app
        config = OmegaConf.to_container(cfg, resolve=False)
    # Passwords in URIs (tracking, storage) masked: a checkpoint is shared and logged as an artifact.
    return {"config": _masked(config),
            "categories": {"ids": list(categories.category_ids), "names": list(categories.names)}}


def _masked(node):
    """``node`` (nested dicts and lists) with every string passed through ``mask_secrets``."""
    if isinstance(node, dict):
        return {key: _masked(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_masked(value) for value in node]
    return mask_secrets(node) if isinstance(node, str) else node


def _check_oracle(data: DataBundle) -> None:
    """``method.pseudo_labels=oracle`` needs unlabeled images whose hidden ground truth exists."""
    if data.unlabeled is None:
        raise ValueError("method.pseudo_labels=oracle needs unlabeled images (a semi-supervised method)")
    if not data.unlabeled.coco.dataset.get("annotations"):
        raise ValueError(f"method.pseudo_labels=oracle needs hidden ground truth, and {data.unlabeled.coco.source_path} "
                         "has no annotations (it is really unlabeled)")


def _log_run_inputs(tracker: Tracker, cfg: DictConfig, data) -> None:
    """Flattened params, the resolved config, and the json files read (a new run only)."""
    tracker.log_params(flatten(cfg))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    for context, dataset in _data_sets(data):
        details = {"images": len(dataset), "boxes": dataset.box_count, "degenerate_boxes": dataset.degenerate_boxes,
                   "image_dir": str(dataset.image_dir)}
        tracker.log_dataset(dataset.coco.source_path, f"{cfg.data.name}/{Path(dataset.coco.source_path).name}",
                            context, details)
    tracker.log_metrics(data_counts(data), 0)


def _data_sets(data: DataBundle):
    """(MLflow dataset context, dataset) of each set a run reads (supervised: no unlabeled set)."""
    sets = (("train", data.labeled), ("unlabeled", data.unlabeled), ("eval", data.val), ("test", data.test))
    return [(context, dataset) for context, dataset in sets if dataset is not None]


def data_counts(data: DataBundle) -> dict[str, float]:
    """``data/<set>/{images,boxes,degenerate_boxes}`` of the sets a run reads."""
    counts = {}
    for context, dataset in _data_sets(data):
        counts.update({f"data/{context}/images": len(dataset), f"data/{context}/boxes": dataset.box_count,
                       f"data/{context}/degenerate_boxes": dataset.degenerate_boxes})
    return counts


def _run_context(accelerator: Accelerator) -> dict[str, str]:
    """Provenance (see ``provenance_tags``) and where the run trains: device and processes."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {**provenance_tags(), "ssod.device": f"{device.type} ({name})", "ssod.processes": str(accelerator.num_processes)}


# How a run is started and named, not what it trains: a tuning retry changes them.
_NOT_COMPARED = ("train.resume", "train.run_name", "tracking.")


def _log_resume(tracker: Tracker, cfg: DictConfig, step: int, checkpoint: Path) -> None:
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


def _schedule_scalars(optimizer, state: RunState, method: Method, seconds_per_iter: float) -> dict[str, float]:
    """Per-interval scalars of the schedule and of the faults met so far."""
    last_ema_step = max(state.ema_steps - 1, 0)
    return {
        "train/sec_per_iter": seconds_per_iter,
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/nonfinite_steps": state.nonfinite_steps,
        "train/bad_images": len(state.bad_files),
        "train/ema_momentum": ema_momentum(last_ema_step, method.ema.momentum),
        "train/polish_ema_momentum": ema_momentum(last_ema_step, method.ema.polish_momentum, method.ema.polish_warmup),
        "train/unsup_weight": method.schedule.unsup_weight_at(max(state.step - 1, 0)),
    }


def _log_run_outputs(tracker: Tracker, final_metrics: dict, final_checkpoint: Path, log_checkpoint: bool) -> None:
    """``final_metrics.json`` and, when asked, the final checkpoint as artifacts."""
    tracker.log_dict(final_metrics, "final_metrics.json")
    if log_checkpoint and final_checkpoint.is_file():
        tracker.log_artifact(final_checkpoint, "checkpoints")


def _is_prune(error: BaseException) -> bool:
    return type(error).__name__ == "TrialPruned"


def _evaluate_both(training: Training, val_loader, interrupts: Optional[Interrupts] = None,
                   prefix: str = "val") -> dict[str, float]:
    """``<prefix>/teacher/bbox_*`` and ``<prefix>/student/bbox_*`` (main process; empty elsewhere).

    With ``interrupts`` and one process, a stop request cuts the evaluation short
    (``EvaluationInterrupted``); several processes finish it together (one alone leaving
    would hang the others in the gather).
    """
    accelerator = training.accelerator
    metrics: dict[str, float] = {}
    can_stop = interrupts is not None and accelerator.num_processes == 1
    should_stop = (lambda: interrupts.requested) if can_stop else (lambda: False)
    for name, detector in (("teacher", training.teacher.detector), ("student", accelerator.unwrap_model(training.student).detector)):
        result = evaluate(detector, val_loader, accelerator, should_stop)
        if result is not None:
            metrics.update({f"{prefix}/{name}/bbox_{key}": value for key, value in result.items()})
    return metrics


def _evaluate_test(cfg: DictConfig, data: DataBundle, training: Training, tracker: Tracker) -> dict[str, float]:
    """``test/{teacher,student}/bbox_*`` of the finished run, logged at its last step: the
    held-out set is read once, here, never during training (no choice is made on it)."""
    accelerator = training.accelerator
    pin = accelerator.device.type == "cuda"
    loader = eval_loader(data.test, shard(data.test, accelerator), num_workers=eval_workers(cfg.data, accelerator.device),
                         pin_memory=pin)
    metrics = _evaluate_both(training, loader, prefix="test")
    if accelerator.is_main_process:
        tracker.log_metrics(metrics, training.state.step)
    return metrics


def _progress(accelerator, train, start: int):
    if not (train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=train.iterations, initial=start, desc="train", dynamic_ncols=True)
