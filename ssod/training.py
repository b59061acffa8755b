"""Training, as a library: ``run(cfg)`` trains a detector with the method ``cfg.method`` names.

``ssod-train`` (``ssod.train``) and the tuner (``ssod.tuning``) call ``run``. It builds
everything in plain sight, ``ssod.loop.train_loop`` iterates (one ``ssod.step.train_step`` each, then
logging, evaluation and checkpoints at their intervals), and ``run`` returns the final metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf

from ssod.build import apply_speed_settings, build_optimizer, build_scheduler
from ssod.checkpoint import (
    BEST_NAME,
    DirectoryLock,
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
from ssod.interrupts import Interrupts
from ssod.io import write_json_atomic, write_text_atomic
from ssod.loop import TRACKING_INCOMPLETE_STATUS, EvalCallback, Loaders, RunResult, evaluate_both, train_loop
from ssod.methods import Method, build_method
from ssod.mlflow_view import FINAL_STUDENT_AP, FINAL_TEACHER_AP
from ssod.outputs import (
    HydraJob,
    launch_command,
    place_run,
    point_latest,
    run_description,
    run_name,
    short_params,
    write_hydra_files,
)
from ssod.report import VAL_DETECTIONS, log_before_after, log_final_reports
from ssod.resume import continue_schedule, find_resume, log_resume, use_configured_rates
from ssod.run_state import RunState, optimizer_parameter_names
from ssod.step import Training, forget_accelerator
from ssod.sweep import sweep_parent_run_id
from ssod.tracking import (
    SPOOL_DIR,
    Tracker,
    bound_requests,
    check_reachable,
    default_tracking_uri,
    machine_description,
    mask_secrets,
    provenance_tags,
)

__all__ = ["TRACKING_INCOMPLETE_STATUS", "RunResult", "describe_run", "run"]

log = logging.getLogger(__name__)



def run(cfg: DictConfig, on_eval: Optional[EvalCallback] = None) -> dict[str, float]:
    """Train with ``cfg`` and return the final metrics (``val/teacher/bbox_AP``, ...).

    ``on_eval(step, metrics)`` is called on the main process after every evaluation; it
    may raise (e.g. ``optuna.TrialPruned``) to stop training, which ends the MLflow run
    KILLED after a checkpoint.
    """
    validate(cfg)  # before anything is created: no MLflow run, no output folder
    method = build_method(OmegaConf.to_object(cfg.method))
    project_dir = Path.cwd()
    uri = cfg.tracking.uri or default_tracking_uri(project_dir)
    # Every MLflow call of this process waits on a server that went away for seconds, not
    # for minutes of MLflow's retries: a stop request is acted on within the step.
    bound_requests(cfg.tracking.request_timeout_s, cfg.tracking.request_retries)
    if int(os.environ.get("RANK", "0")) == 0 and cfg.tracking.enabled:
        check_reachable(uri)  # seconds, not minutes of MLflow's retries
    job = HydraJob.current()
    given = cfg
    accelerator = _accelerator(cfg.train)
    _only_main_process_informs(accelerator)
    lock = None
    try:
        # The first process places the run (a new folder is named after the time, which
        # the others could read a second later) and tells the others where it is.
        output_dir = _agree_on_folder(accelerator, cfg, project_dir, job)
        cfg = _with_place_and_name(cfg, output_dir, project_dir, job)
        train = cfg.train
        ckpt_dir = output_dir / "checkpoints"
        # The first process locks the folder before anything else: a second training into it stops here.
        lock = DirectoryLock(ckpt_dir) if accelerator.is_main_process else None
        with _held_warnings() as early:  # said before the run's console.log exists (a checkpoint set aside)
            resume_path, resumed = find_resume(train.resume, ckpt_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        forget_accelerator(accelerator)  # a failed start leaves no process-wide state behind
        raise
    set_seed(train.seed)
    tracker = Tracker(uri, cfg.tracking.experiment, enabled=accelerator.is_main_process and cfg.tracking.enabled,
                      spool_dir=output_dir / SPOOL_DIR, system_metrics=_system_metrics(cfg.tracking))
    interrupts = Interrupts()
    status, training, final_metrics, loaders = "FAILED", None, None, None
    # The run's log lines, kept beside its checkpoints (appended to by each resume) and in MLflow.
    console_log = _keep_console_log(output_dir / CONSOLE_LOG) if accelerator.is_main_process else None
    for record in early if console_log is not None else ():
        console_log.handle(record)  # into the file only: the console has shown them
    try:
        log.info("output folder: %s", output_dir)
        if job is not None and accelerator.is_main_process:
            write_hydra_files(output_dir, given, job)  # where Hydra keeps its record of a job
        with accelerator.main_process_first():
            data = build_data(cfg.data, project_dir, need_unlabeled=method.needs_unlabeled)
        tags = dict(cfg.tracking.tags)
        if method.oracle:
            _check_oracle(data)
            tags["ssod.oracle"] = "true"
        training = _build_training(cfg, method, data.category_map.num_classes, accelerator, ckpt_dir, resumed)
        training.describe = describe_run(cfg, data.category_map)
        if accelerator.is_main_process:  # beside the checkpoints, for a person to read (and resume=auto)
            write_text_atomic(OmegaConf.to_yaml(training.describe["config"]), output_dir / "config.yaml")
        if resumed:
            log.info("resuming from %s at step %d", resume_path, training.state.step)
        # A resume from before a checkpoint the run already saved (train.resume=<file>, going
        # back) continues in a new MLflow run (see Tracker.start), and only once that and the
        # model are set up are the folder's later checkpoints set aside. The folder's
        # checkpoints tell how far the run went only if the resumed one is of it.
        on_disk = list_checkpoints(ckpt_dir) if resumed and is_in_folder(resume_path, ckpt_dir) else []
        # A multirun's job nests under the sweep's parent run (ssod.sweep), unless told another.
        parent = cfg.tracking.parent_run_id or (sweep_parent_run_id(job.sweep_dir) if job and job.sweep_dir else "")
        training.state.run_id = tracker.start(
            train.run_name, tags, parent, run_id=training.state.run_id,
            resume_step=training.state.step if resumed else None, saved_step=on_disk[-1][0] if on_disk else 0,
            new_run_tags=_run_context(accelerator) if tracker.enabled else {}, distinct=not given.train.run_name,
        )
        if tracker.run_id:
            log.info("MLflow run %s (experiment %s) in %s; see it: %s", tracker.run_id, cfg.tracking.experiment,
                     mask_secrets(uri), tracker.links())
        if resumed and train.resume != "auto" and accelerator.is_main_process:
            set_aside_other_checkpoints(ckpt_dir, resume_path, training.state.step)
        training.on_saved = tracker.note_checkpoint
        if accelerator.is_main_process:
            point_latest(output_dir)  # the newest run that started
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
        loaders = _build_loaders(cfg, data, accelerator, training.state.step)
        if resumed:
            set_rng_state(resumed["rng"])  # after the loaders: creating them draws from the RNG
        final_metrics = train_loop(cfg, method, data, training, loaders, tracker, interrupts, on_eval)
        status = final_metrics.status
        if status == "FINISHED" and data.test is not None and cfg.train.evaluate_test:
            final_metrics.update(_evaluate_test(cfg, data, training, tracker))
        if accelerator.is_main_process and status == "FINISHED":
            final_checkpoint = checkpoint_path(ckpt_dir, training.state.step)
            # Beside the checkpoints first: readable with tracking off (a benchmark on a GPU machine).
            # JSON has no NaN: an undefined metric (no ground truth of that size) is null.
            finite = {key: value if not isinstance(value, float) or math.isfinite(value) else None
                      for key, value in final_metrics.items()}
            write_json_atomic({**finite, "step": training.state.step, "mlflow_run_id": tracker.run_id or None,
                               "machine": machine_description()}, output_dir / "final_metrics.json")
            _log_run_outputs(tracker, final_metrics, final_checkpoint, cfg.tracking.log_checkpoint_artifact,
                             training.state.step)
            log_final_reports(tracker, {"val": (data.val, output_dir / VAL_DETECTIONS),
                                        "test": (data.test, output_dir / TEST_DETECTIONS)})
            log_before_after(tracker)
            if cfg.tracking.log_model or cfg.tracking.registered_model_name:
                _log_model(tracker, training, cfg.tracking.registered_model_name)
            _describe_results(tracker, description, final_metrics, training)
            # AP in percent, as papers and this README print it (MLflow holds pycocotools' 0-1 values).
            log.info("finished at step %d: teacher AP %.1f, student AP %.1f (COCO AP in %%, validation set); checkpoint %s",
                     training.state.step, 100 * final_metrics.get("val/teacher/bbox_AP", math.nan),
                     100 * final_metrics.get("val/student/bbox_AP", math.nan), final_checkpoint)
            if training.state.best_value is not None:
                log.info("best checkpoint: %s (step %d, %s %.4f)", ckpt_dir / BEST_NAME, training.state.best_step,
                         cfg.train.best_metric, training.state.best_value)
            if "test/teacher/bbox_AP" in final_metrics:
                log.info("held-out test set: teacher AP %.1f, student AP %.1f (COCO AP in %%)",
                         100 * final_metrics.get("test/teacher/bbox_AP", math.nan),
                         100 * final_metrics.get("test/student/bbox_AP", math.nan))
            if tracker.run_id:
                log.info("see it in MLflow: %s", tracker.links())
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
        if loaders is not None:  # now: a process training run after run keeps no run's workers
            shut_down_workers(loaders.labeled, loaders.unlabeled, loaders.val)
        if console_log is not None and tracker.run_id:  # a run that failed before its MLflow run exists has none
            console_log.flush()
            tracker.log_artifact(console_log.baseFilename)
        tracker.end(status)
        if tracker.spooled is not None:
            # The last line a user sees: the run is not fully in MLflow yet.
            if final_metrics is not None:
                final_metrics.tracking_incomplete = True
            log.error("tracking incomplete: the MLflow server did not take the run's last metric values, tags or "
                      "artifacts and its end (%s); they are kept in %s and sent by the next run in this folder or by `ssod-sync %s`",
                      status, tracker.spooled, output_dir)
        if console_log is not None:
            logging.getLogger().removeHandler(console_log)
            console_log.close()
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


# The run's log lines, in its output folder (and as an MLflow artifact of that name).
CONSOLE_LOG = "console.log"


class _MaskedFormatter(logging.Formatter):
    """Log lines with passwords in URIs masked, as on the console."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


@contextmanager
def _held_warnings() -> Iterator[list[logging.LogRecord]]:
    """The warnings logged inside the block, kept (as well as shown) for the run's console.log."""
    held: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = held.append
    logging.getLogger().addHandler(handler)
    try:
        yield held
    finally:
        logging.getLogger().removeHandler(handler)


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _only_main_process_informs(accelerator: Accelerator) -> None:
    """The other processes of a distributed run print only warnings and errors, each line
    marked with its rank: the console shows a run once, not once per process."""
    if accelerator.is_main_process:
        return
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    for handler in root.handlers:
        if not any(isinstance(f, _RankPrefix) for f in handler.filters):
            handler.addFilter(_RankPrefix(accelerator.process_index))


def _keep_console_log(path: Path) -> logging.FileHandler:
    """Copy every log line the run prints (every logger, from INFO) into ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_MaskedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)  # the levels are the console's (Hydra's job logging: INFO)
    return handler


def _agree_on_folder(accelerator: Accelerator, cfg: DictConfig, project_dir: Path, job) -> Path:
    """The run's folder, placed by the first process and sent to the others; its error (a
    missing checkpoint to resume) is raised by every process, none waits for a folder."""
    placed = None
    if accelerator.is_main_process:
        try:
            placed = place_run(cfg, project_dir, job)
        except Exception as error:  # noqa: BLE001 - sent, then raised here too
            placed = error
    placed = broadcast_object_list([placed])[0]
    if isinstance(placed, Exception):
        raise placed
    return placed


def _with_place_and_name(cfg: DictConfig, output_dir: Path, project_dir: Path, job) -> DictConfig:
    """A copy of ``cfg`` that says where the run is (relative to the project when inside
    it) and its name: what the params, ``config.yaml`` and the checkpoints carry."""
    placed = copy.deepcopy(cfg)
    try:
        where = output_dir.relative_to(project_dir)
    except ValueError:
        where = output_dir
    placed.train.output_dir = str(where)
    placed.train.run_name = run_name(cfg, job)
    return placed


def _accelerator(train) -> Accelerator:
    # Several processes (torchrun) on a machine without CUDA: accelerate sets up gloo data
    # parallelism only when told cpu=True; otherwise every process trains alone as rank 0,
    # each with its own MLflow run.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=mixed_precision(train.mixed_precision),
        cpu=train.cpu or multi_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.find_unused_parameters)],
    )


def mixed_precision(configured: Optional[str]) -> str:
    """The precision to train in: ``train.mixed_precision`` when set (with a warning when the
    launcher, ``accelerate launch`` or ``accelerate config``, said another), else the launcher's."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured is None:
        return launcher or "no"
    if launcher is not None and launcher != configured:
        log.warning("train.mixed_precision=%s overrides the launcher's mixed precision %s "
                    "(leave train.mixed_precision=null to use the launcher's)", configured, launcher)
    return configured


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


def _system_metrics(tracking) -> bool:
    """``tracking.system_metrics``, or MLflow's variable when null (on when that is unset too)."""
    if tracking.system_metrics is not None:
        return bool(tracking.system_metrics)
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("true", "1")


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


def _is_prune(error: BaseException) -> bool:
    return type(error).__name__ == "TrialPruned"


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
