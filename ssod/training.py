"""Training, as a library: ``run(cfg)`` trains a detector with the method ``cfg.method`` names.

``ssod-train`` (``ssod.train``) and the tuner (``ssod.tuning``) call ``run``. It builds
everything in plain sight, ``ssod.loop.train_loop`` iterates (one ``ssod.step.train_step`` each, then
logging, evaluation and checkpoints at their intervals), and ``run`` returns the final metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import socket
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from ssod.build import apply_speed_settings, build_optimizer, build_scheduler
from ssod.checkpoint import (
    BEST_NAME,
    checkpoint_file,
    checkpoint_path,
    is_in_folder,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    set_aside_other_checkpoints,
    set_rng_state,
)
from ssod.config import eval_workers, flatten, validate
from ssod.data.pipeline import DataBundle, build_data
from ssod.data.sampling import infinite_loader, shut_down_workers
from ssod.inference import eval_loader, shard
from ssod.io import write_json_atomic, write_text_atomic
from ssod.loop import TRACKING_INCOMPLETE_STATUS, EvalCallback, Loaders, RunResult, evaluate_both, train_loop
from ssod.masking import mask_secrets
from ssod.methods import Method, build_method
from ssod.mlflow_view import FINAL_STUDENT_AP, FINAL_TEACHER_AP
from ssod.outputs import launch_command, point_latest, run_description, short_params, write_hydra_files
from ssod.report import VAL_DETECTIONS, log_before_after, log_final_reports
from ssod.resume import continue_schedule, log_resume, use_configured_rates
from ssod.run_state import RunState, optimizer_parameter_names
from ssod.session import RunSession
from ssod.step import Training
from ssod.sweep import sweep_parent_run_id
from ssod.tracking import Tracker, machine_description, provenance_tags

__all__ = ["TRACKING_INCOMPLETE_STATUS", "RunResult", "describe_run", "run"]

log = logging.getLogger(__name__)



def run(cfg: DictConfig, on_eval: Optional[EvalCallback] = None) -> dict[str, float]:
    """Train with ``cfg`` and return the final metrics (``val/teacher/bbox_AP``, ...).

    ``on_eval(step, metrics)`` is called on the main process after every evaluation; it
    may raise (e.g. ``optuna.TrialPruned``) to stop training, which ends the MLflow run
    KILLED after a checkpoint. The run's lifecycle (processes, folder and lock, MLflow run,
    signals, console log) is ``ssod.session.RunSession``'s.
    """
    validate(cfg)  # before anything is created: no MLflow run, no output folder
    method = build_method(OmegaConf.to_object(cfg.method))
    with RunSession(cfg) as session:
        cfg, accelerator, tracker = session.cfg, session.accelerator, session.tracker
        data = _read_data(session, method)
        training = session.training = _build_training(cfg, method, data.category_map.num_classes, accelerator,
                                                      session.ckpt_dir, session.resumed)
        description = _start_tracking(session, method, data, training)
        session.loaders = _build_loaders(cfg, data, accelerator, training.state.step)
        if session.resumed:
            set_rng_state(session.resumed["rng"])  # after the loaders: creating them draws from the RNG
        final = session.final = train_loop(cfg, method, data, training, session.loaders, tracker, session.interrupts,
                                           on_eval)
        session.status = final.status
        if final.status == "FINISHED" and data.test is not None and cfg.train.evaluate_test:
            final.update(_evaluate_test(cfg, data, training, tracker))
        if accelerator.is_main_process and final.status == "FINISHED":
            _finish(session, data, training, final, description)
        return final


def _read_data(session: RunSession, method: Method) -> DataBundle:
    """The run's datasets (the main process builds what is missing first), with Hydra's record
    of the job in the run's folder."""
    log.info("output folder: %s", session.output_dir)
    if session.job is not None and session.accelerator.is_main_process:
        write_hydra_files(session.output_dir, session.given, session.job)  # where Hydra keeps its record of a job
    with session.accelerator.main_process_first():
        data = build_data(session.cfg.data, session.project_dir, need_unlabeled=method.needs_unlabeled)
    if method.oracle:
        _check_oracle(data)
    return data


def _start_tracking(session: RunSession, method: Method, data: DataBundle, training: Training) -> str:
    """Open the MLflow run (a new one, or the resumed one's; see ``Tracker.start``), say what
    the run is, and set aside the checkpoints a going-back resume leaves; returns the run's
    description."""
    cfg, accelerator, tracker, job = session.cfg, session.accelerator, session.tracker, session.job
    resumed, resume_path, ckpt_dir = session.resumed, session.resume_path, session.ckpt_dir
    training.describe = describe_run(cfg, data.category_map)
    if accelerator.is_main_process:  # beside the checkpoints, for a person to read (and resume=auto)
        write_text_atomic(OmegaConf.to_yaml(training.describe["config"]), session.output_dir / "config.yaml")
    if resumed:
        log.info("resuming from %s at step %d", resume_path, training.state.step)
    tags = {**cfg.tracking.tags, **({"ssod.oracle": "true"} if method.oracle else {})}
    # A resume from before a checkpoint the run already saved (train.resume=<file>, going
    # back) continues in a new MLflow run (see Tracker.start), and only once that and the
    # model are set up are the folder's later checkpoints set aside. The folder's
    # checkpoints tell how far the run went only if the resumed one is of it.
    on_disk = list_checkpoints(ckpt_dir) if resumed and is_in_folder(resume_path, ckpt_dir) else []
    # A multirun's job nests under the sweep's parent run (ssod.sweep), unless told another.
    parent = cfg.tracking.parent_run_id or (sweep_parent_run_id(job.sweep_dir) if job and job.sweep_dir else "")
    training.state.run_id = tracker.start(
        cfg.train.run_name, tags, parent, run_id=training.state.run_id,
        resume_step=training.state.step if resumed else None, saved_step=on_disk[-1][0] if on_disk else 0,
        new_run_tags=_run_context(accelerator) if tracker.enabled else {}, distinct=not session.given.train.run_name,
    )
    if tracker.run_id:
        log.info("MLflow run %s (experiment %s) in %s; see it: %s", tracker.run_id, cfg.tracking.experiment,
                 mask_secrets(session.uri), tracker.links())
    if resumed and cfg.train.resume != "auto" and accelerator.is_main_process:
        set_aside_other_checkpoints(ckpt_dir, resume_path, training.state.step)
    training.on_saved = tracker.note_checkpoint
    if accelerator.is_main_process:
        point_latest(session.output_dir)  # the newest run that started
    for context, dataset in data.named_sets():
        log.info("%s set: %d images, %d boxes; %d degenerate boxes dropped, %d cut to the image's border (%s)",
                 context, len(dataset), dataset.box_count, dataset.degenerate_boxes, dataset.clipped_boxes,
                 dataset.coco.source_path)
    command = launch_command(job)
    description = run_description(cfg, method.title, method.oracle, command, accelerator.num_processes)
    if not resumed or tracker.branched_from:
        tracker.describe(description)
        _log_run_inputs(tracker, cfg, data)
        tracker.log_params(_distribution_params(accelerator, cfg.train, command))
    else:
        log_resume(tracker, cfg, training.state.step, resume_path)
    return description


def _finish(session: RunSession, data: DataBundle, training: Training, final: RunResult, description: str) -> None:
    """A finished run's outputs (main process): ``final_metrics.json``, the final APs, reports and
    plots, the logged model when asked, the description with the results, the console's summary."""
    cfg, tracker, output_dir, step = session.cfg, session.tracker, session.output_dir, training.state.step
    final_checkpoint = checkpoint_path(session.ckpt_dir, step)
    # Beside the checkpoints first: readable with tracking off (a benchmark on a GPU machine).
    # JSON has no NaN: an undefined metric (no ground truth of that size) is null.
    finite = {key: value if not isinstance(value, float) or math.isfinite(value) else None for key, value in final.items()}
    write_json_atomic({**finite, "step": step, "mlflow_run_id": tracker.run_id or None, "machine": machine_description()},
                      output_dir / "final_metrics.json")
    _log_run_outputs(tracker, final, final_checkpoint, cfg.tracking.log_checkpoint_artifact, step)
    log_final_reports(tracker, {"val": (data.val, output_dir / VAL_DETECTIONS),
                                "test": (data.test, output_dir / TEST_DETECTIONS)})
    log_before_after(tracker)
    if cfg.tracking.log_model or cfg.tracking.registered_model_name:
        _log_model(tracker, training, cfg.tracking.registered_model_name)
    _describe_results(tracker, description, final, training)
    # AP in percent, as papers and this README print it (MLflow holds pycocotools' 0-1 values).
    log.info("finished at step %d: teacher AP %.1f, student AP %.1f (COCO AP in %%, validation set); checkpoint %s",
             step, 100 * final.get("val/teacher/bbox_AP", math.nan), 100 * final.get("val/student/bbox_AP", math.nan),
             final_checkpoint)
    if training.state.best_value is not None:
        log.info("best checkpoint: %s (step %d, %s %.4f)", session.ckpt_dir / BEST_NAME, training.state.best_step,
                 cfg.train.best_metric, training.state.best_value)
    if "test/teacher/bbox_AP" in final:
        log.info("held-out test set: teacher AP %.1f, student AP %.1f (COCO AP in %%)",
                 100 * final.get("test/teacher/bbox_AP", math.nan), 100 * final.get("test/student/bbox_AP", math.nan))
    if tracker.run_id:
        log.info("see it in MLflow: %s", tracker.links())


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
            state = continue_schedule(initial, optimizer, scheduler, train, optimizer_parameter_names(student, optimizer))
        log.info("initialised from %s (step %d)%s", train.init_from, initial["step"],
                 ", continuing its schedule" if train.init_continue else "")
    if resumed:
        student.load_state_dict(resumed["student"])
        teacher.load_state_dict(resumed["teacher"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        use_configured_rates(optimizer, scheduler, train)
        state = RunState.from_checkpoint(resumed)
    student, optimizer = accelerator.prepare(student, optimizer)
    if resumed and accelerator.scaler is not None and "scaler" in resumed:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    teacher.to(accelerator.device)
    return Training(accelerator, student, teacher, optimizer, scheduler, state, ckpt_dir, train.keep_checkpoints)


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
    """Flattened params, the short ones (method, percent, seed), the sets' counts
    (``data/<set>/...``: params, not metrics, they do not change), the resolved config, and
    the json files read (a new run only)."""
    counts = {name: str(int(value)) for name, value in data.counts().items()}
    tracker.log_params({**flatten(cfg), **short_params(cfg), **counts})
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    for context, dataset in data.named_sets():
        details = {"images": len(dataset), "boxes": dataset.box_count, "degenerate_boxes": dataset.degenerate_boxes,
                   "clipped_boxes": dataset.clipped_boxes, "image_dir": str(dataset.image_dir)}
        tracker.log_dataset(dataset.coco.source_path, f"{cfg.data.name}/{Path(dataset.coco.source_path).name}",
                            context, details)


def _distribution_params(accelerator: Accelerator, train, command: Optional[str]) -> dict:
    """How many processes train the run, with which batches, at which rate, started how."""
    world = accelerator.num_processes
    return {
        "dist.world_size": world,
        "dist.batch_labeled_per_process": train.batch_labeled,
        "dist.batch_unlabeled_per_process": train.batch_unlabeled,
        "dist.global_batch_labeled": world * train.batch_labeled,
        "dist.global_batch_unlabeled": world * train.batch_unlabeled,
        # DDP averages the gradients of all processes; train.lr is not scaled with their number.
        "dist.effective_lr": train.lr,
        "dist.command": command or "(library call)",
    }


def _run_context(accelerator: Accelerator) -> dict[str, str]:
    """Provenance (see ``provenance_tags``) and where the run trains: device, machine and processes."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {**provenance_tags(), "ssod.device": f"{device.type} ({name})", "ssod.machine": machine_description(),
            "ssod.processes": str(accelerator.num_processes),
            "ssod.mixed_precision": str(accelerator.mixed_precision)}


def _log_run_outputs(tracker: Tracker, final_metrics: dict, final_checkpoint: Path, log_checkpoint: bool,
                     step: int) -> None:
    """The final validation APs as ``final/{teacher,student}_AP`` (the runs table's columns, the
    charts' first section), ``final_metrics.json`` and, when asked, the final checkpoint as artifacts."""
    tracker.log_metrics({FINAL_TEACHER_AP: final_metrics.get("val/teacher/bbox_AP", math.nan),
                         FINAL_STUDENT_AP: final_metrics.get("val/student/bbox_AP", math.nan)}, step)
    tracker.log_dict(final_metrics, "final_metrics.json")
    if log_checkpoint and final_checkpoint.is_file():
        tracker.log_artifact(final_checkpoint, "checkpoints")



def _log_model(tracker: Tracker, training: Training, registered_name: str) -> None:
    """The final teacher detector (on the CPU, without the polishing networks) as the run's
    MLflow logged model "model", with the package's code and the label -> category map."""
    import ssod

    detector = copy.deepcopy(training.accelerator.unwrap_model(training.teacher).detector).cpu().eval()
    categories = training.describe["categories"]
    metadata = {
        "weights": "teacher", "step": training.state.step, "categories": categories,
        "input": "a list of images, each a float tensor [3, H, W] with values in [0, 1] (RGB), any size",
        "output": "per image a dict: boxes [K, 4] (x1, y1, x2, y2 in the image's pixels), scores [K], labels [K] "
                  "(label i is category categories.ids[i - 1], named categories.names[i - 1])",
    }
    uri = tracker.log_model(detector, "model", training.state.step, metadata, [str(Path(ssod.__file__).parent)],
                            registered_name)
    if uri:
        log.info("MLflow logged model %s (teacher detector)%s", uri,
                 f", registered as {registered_name}" if registered_name else "")


def _describe_results(tracker: Tracker, description: str, metrics: dict, training: Training) -> None:
    """The run's description with its final APs and where its weights are (unless a person
    has rewritten it)."""
    step, state = training.state.step, training.state
    results = [f"Finished at step {step}: teacher AP {100 * metrics.get('val/teacher/bbox_AP', math.nan):.1f}, "
               f"student AP {100 * metrics.get('val/student/bbox_AP', math.nan):.1f} (COCO AP in %, validation set)"]
    if "test/teacher/bbox_AP" in metrics:
        results.append(f"held-out test set: teacher AP {100 * metrics['test/teacher/bbox_AP']:.1f}, "
                       f"student AP {100 * metrics['test/student/bbox_AP']:.1f}")
    folder = training.ckpt_dir.parent
    best = f"`{training.ckpt_dir / BEST_NAME}` (step {state.best_step}) and " if state.best_value is not None else ""
    weights = (f"Weights: {best}`{checkpoint_path(training.ckpt_dir, step)}` on {socket.gethostname()}; "
               f"`ssod-eval {folder}` and `ssod-export {folder}` take the best.")
    tracker.describe(description + "\n\n" + "; ".join(results) + ".\n\n" + weights, only_if_ours=True)



# Folder of a run's held-out test detections (``<output_dir>/test_detections/teacher.json.gz``).
TEST_DETECTIONS = "test_detections"


def _evaluate_test(cfg: DictConfig, data: DataBundle, training: Training, tracker: Tracker) -> dict[str, float]:
    """``test/{teacher,student}/bbox_*`` of the finished run, logged at its last step: the
    held-out set is read once, here, never during training (no choice is made on it)."""
    accelerator = training.accelerator
    pin = accelerator.device.type == "cuda"
    loader = eval_loader(data.test, shard(data.test, accelerator), num_workers=eval_workers(cfg.data, accelerator.device),
                         pin_memory=pin)
    # The detections stay beside the checkpoints: the method benchmark bootstraps its
    # intervals over the test images from them, without the detector.
    try:
        metrics = evaluate_both(training, loader, prefix="test", progress=cfg.train.progress,
                                save_dir=training.ckpt_dir.parent / TEST_DETECTIONS)
    finally:
        shut_down_workers(loader)
    if accelerator.is_main_process:
        tracker.log_metrics(metrics, training.state.step)
    return metrics
