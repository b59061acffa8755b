"""Where an iteration's time goes (``ssod-bench``).

On one fixed batch of the chosen experiment, after warm-up, the median over repeats of:
a supervised step on the labeled images; a supervised step on labeled + unlabeled images
(the floor for the student's share); teacher inference on the weak views; polishing
(voting, pooling, both networks, training and inference); the full ``soft_teacher`` and
``polish_teacher`` steps; data loading per batch; MLflow logging per interval; and
evaluation throughput against the detector's own inference throughput. The training
parts run in turn, round by round, so that a noisy machine's slow spells fall on all of
them alike. Prints a table, the ratios, and logs everything to MLflow (experiment
``ssod-bench``)::

    ssod-bench                                  # CPU, the synthetic experiment
    ssod-bench --device cuda --overrides experiment=coco_partial data=synthetic model.weights_backbone=null
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch.autograd import DeviceType

from ssod.build import apply_speed_settings, build_optimizer
from ssod.checkpoint import checkpoint_file, load_checkpoint, load_weights
from ssod.config import compose, eval_workers, flatten
from ssod.data.pipeline import build_data
from ssod.data.sampling import infinite_loader
from ssod.data.transforms import project_target
from ssod.inference import detections_to_host, eval_loader, predict
from ssod.methods import build_method
from ssod.mlflow_client import default_tracking_uri
from ssod.run_state import RunState
from ssod.step import Training, forget_accelerator, to_device, train_step
from ssod.teaching import SemiSupervisedModel
from ssod.tracking import Tracker


STEPS = (
    "supervised step (labeled)",
    "supervised step (labeled + unlabeled)",
    "teacher inference (weak views)",
    "polishing (train + polish)",
    "soft_teacher step",
    "polish_teacher step",
)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` (synchronising the GPU around each call)."""
    return interleaved_medians({"fn": fn}, device, repeats, warmup)[0]["fn"]


def interleaved_medians(
    parts: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time of each part, and its peak GPU memory in GiB (CUDA only).

    The parts run in turn, one call each per round, so that the slow spells of a shared,
    noisy machine fall on all of them alike and their ratios stay comparable (timed one
    part after another, a ratio of two parts moved by 10-20% from run to run).
    """
    for _ in range(warmup):
        for fn in parts.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in parts.items():
            _synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    return {name: statistics.median(values) for name, values in times.items()}, peaks


def make_step(training: Training, method, weights: dict[str, float], train, labeled: list, unlabeled: list,
              nonfinite: list) -> Callable[[], torch.Tensor]:
    """One training step on a fixed batch: training's ``train_step`` (losses, the flags'
    all-reduce, backward, optimizer, EMA of the detector and the polishing networks; fp16
    steps scaled by accelerate's scaler, overflowing steps skipped), with the learning rate
    held, the step counter fixed, no stop ever requested and non-finite steps never given
    up on.

    Each step appends to ``nonfinite`` whether its total loss was NaN or infinite (a NaN
    step does less work, so its time is not a real step's).
    """

    def step():
        _, total, flags = train_step(training, labeled, unlabeled, method, weights, train, lambda: False)
        nonfinite.append(flags.nonfinite)
        return total

    return step


def as_labeled(unlabeled: list) -> list:
    """Strong views with their hidden ground truth projected into them, as labeled samples."""
    samples = []
    for _, strong, hidden in unlabeled:
        height, width = strong.image.shape[-2:]
        samples.append((strong.image, project_target(hidden, strong.matrix, width, height), strong.matrix))
    return samples


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ssod-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the current GPU (choose it with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--no-mlflow", action="store_true", help="neither measure MLflow logging nor log the results")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="student and teacher weights of a training checkpoint (a file, or a run's checkpoint "
                             "directory: its newest); random weights give no pseudo labels, so the steps then "
                             "polish and project empty sets")
    parser.add_argument("--compare-model", metavar="NAME",
                        help="also time the supervised, soft_teacher and polish_teacher steps with model=NAME "
                             "(e.g. resnet18_fpn), interleaved with the others on the same batch")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many polish_teacher steps (torch.profiler) and print the top operators")
    return parser.parse_args(argv)


@dataclasses.dataclass
class BenchResult:
    rows: dict[str, float]  # seconds per part
    ratios: dict[str, float]
    speeds: dict[str, float]  # images/s of evaluation, its loader alone, the bare model
    throughput: dict[str, float]  # images/s of the training steps
    peak_gib: dict[str, float]  # peak GPU memory per training part (CUDA only)
    nonfinite: dict[str, int]  # steps with a NaN or infinite loss, per part that had any
    report: str


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = compose(["method=polish_teacher", *args.overrides])
    # The steps are training's own, under an Accelerator as in training (its autocast, its
    # fp16 scaler; on a CPU accelerate gives fp16 no autocast, and neither does training).
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ssod-bench: --device cuda, but PyTorch sees no CUDA GPU here")
    accelerator = Accelerator(mixed_precision=_MIXED_PRECISION[args.precision], cpu=args.device == "cpu")
    try:
        result = measure(args, cfg, accelerator)
    finally:
        forget_accelerator(accelerator)  # tests call main more than once
    print(result.report)
    if not args.no_mlflow:
        _log_to_mlflow(args, cfg, result)
    return 0


_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def measure(args: argparse.Namespace, cfg: DictConfig, accelerator: Accelerator) -> BenchResult:
    """Time every part on one fixed batch; ``args`` are ``ssod-bench``'s options."""
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, Path.cwd(), need_unlabeled=True)
    polish = build_method(OmegaConf.to_object(cfg.method))
    student = apply_speed_settings(cfg.train, polish.build_model(cfg.model, data.category_map.num_classes).to(device))
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    weights_note, start = _load_trained(args.checkpoint, student, teacher) if args.checkpoint else ("random weights", RunState())
    pin = device.type == "cuda"
    labeled_iter = infinite_loader(data.labeled, cfg.train.batch_labeled, 0, 0, 1, 0, cfg.data.num_workers, pin)
    unlabeled_iter = infinite_loader(data.unlabeled, cfg.train.batch_unlabeled, 1, 0, 1, 0, cfg.data.num_workers, pin)
    labeled = to_device(next(labeled_iter)[0], device)
    unlabeled = to_device(next(unlabeled_iter)[0], device)
    everything = labeled + to_device(as_labeled(unlabeled), device)
    # Before the steps move the teacher: the pseudo labels of the weights as given.
    pseudo = _pseudo_label_counts(teacher, labeled, unlabeled, polish, accelerator)
    nonfinite: dict[str, list] = {name: [] for name in STEPS}
    parts = training_parts(cfg, args.overrides, accelerator, student, teacher, labeled, unlabeled, everything, nonfinite, start)
    if args.compare_model:
        parts.update(_other_model_steps(args, data, accelerator, labeled, unlabeled, everything, nonfinite))
    rows, peak_gib = interleaved_medians(parts, device, args.repeats, args.warmup)
    bad_rows = {name: count for name, flags in nonfinite.items() if (count := sum(flags))}
    rows["data loading per batch"] = median_seconds(lambda: (next(labeled_iter), next(unlabeled_iter)), device, args.repeats, args.warmup)
    if not args.no_mlflow:
        rows["mlflow logging per interval"] = _mlflow_cost(args)
    speeds, rows["evaluation loader: first batch"] = _eval_throughput(
        teacher.detector, data.val, device, args.eval_images, eval_workers(cfg.data, device)
    )
    ratios = {
        **{f"{name} / same with {args.compare_model}": rows[name] / rows[_other(name, args.compare_model)]
           for name in COMPARED if args.compare_model},
        "polish / (supervised all + teacher inference)": rows["polish_teacher step"]
        / (rows["supervised step (labeled + unlabeled)"] + rows["teacher inference (weak views)"]),
        "polish / soft_teacher": rows["polish_teacher step"] / rows["soft_teacher step"],
        "eval / model inference throughput": speeds["eval"] / speeds["model"],
    }
    if not args.no_mlflow:
        interval = cfg.train.log_every * rows["polish_teacher step"]
        ratios["mlflow share of training time"] = rows["mlflow logging per interval"] / interval
    images = {STEPS[0]: len(labeled), STEPS[1]: len(everything), STEPS[4]: len(labeled) + len(unlabeled),
              STEPS[5]: len(labeled) + len(unlabeled)}
    if args.compare_model:
        images.update({_other(name, args.compare_model): images[name] for name in COMPARED})
    throughput = {name: count / rows[name] for name, count in images.items()}
    report = f"{weights_note}; {pseudo}\n" + _table(rows, ratios, speeds, args, cfg, throughput, peak_gib)
    if bad_rows:
        # A NaN step skips work (no proposals, nothing to polish): its time is not a real step's.
        report += f"\n\nWARNING: steps with a non-finite loss (their times are not a real step's): {bad_rows}"
    if args.profile:
        report += "\n\n" + _profile(parts["polish_teacher step"], device, args.profile)
    return BenchResult(rows, ratios, speeds, throughput, peak_gib, bad_rows, report)


def training_parts(cfg: DictConfig, overrides: list[str], accelerator: Accelerator, student, teacher, labeled: list,
                   unlabeled: list, everything: list, nonfinite: dict[str, list],
                   start: RunState) -> dict[str, Callable[[], object]]:
    """The six training parts of ``STEPS`` on the fixed batch; the steps share one optimizer.

    ``everything`` is ``labeled`` plus the strong views as labeled images (their hidden
    ground truth). The steps append to ``nonfinite[name]`` whether their loss was not finite.
    Each step's counters start from ``start`` (a fresh run's, or a loaded checkpoint's: at
    step 0 the teacher's EMA momentum is 0 and it becomes the student).
    """
    methods = {name: build_method(OmegaConf.to_object(compose([f"method={name}", *overrides]).method))
               for name in ("supervised", "soft_teacher", "polish_teacher")}
    # The learning rate of the first warm-up step, held: the bench repeats steps on one batch,
    # from random weights too, and the full rate can diverge there (a NaN step does less work).
    optimizer = build_optimizer(OmegaConf.merge(cfg.train, {"lr": cfg.train.lr * cfg.train.warmup_factor}), student)
    held = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    soft_student, soft_teacher = SemiSupervisedModel(student.detector), SemiSupervisedModel(teacher.detector)
    student, soft_student, optimizer = accelerator.prepare(student, soft_student, optimizer)
    # Non-finite steps are counted, never given up on: the bench writes no checkpoint.
    train = OmegaConf.merge(cfg.train, {"max_consecutive_nonfinite": 2**62})

    def step(name: str, model, teacher_model, method: str, labeled_part: list, unlabeled_part: list):
        counters = dataclasses.replace(start, bad_files=[])
        training = Training(accelerator, model, teacher_model, optimizer, held, counters, Path(tempfile.gettempdir()), 0)
        weights = methods[method].loss_weights()
        return make_step(training, methods[method], weights, train, labeled_part, unlabeled_part, nonfinite[name])

    return {
        STEPS[0]: step(STEPS[0], soft_student, soft_teacher, "supervised", labeled, []),
        STEPS[1]: step(STEPS[1], soft_student, soft_teacher, "supervised", everything, []),
        STEPS[2]: _inference(teacher.detector, [u[0].image for u in unlabeled], accelerator),
        STEPS[3]: _polishing(student, teacher, labeled, unlabeled, accelerator),
        STEPS[4]: step(STEPS[4], soft_student, soft_teacher, "soft_teacher", labeled, unlabeled),
        STEPS[5]: step(STEPS[5], student, teacher, "polish_teacher", labeled, unlabeled),
    }


# The steps ``--compare-model`` times with the other model too.
COMPARED = (STEPS[0], STEPS[4], STEPS[5])


def _other(name: str, model: str) -> str:
    return f"{name} [model={model}]"


def _other_model_steps(args, data, accelerator: Accelerator, labeled: list, unlabeled: list, everything: list,
                       nonfinite: dict[str, list]) -> dict[str, Callable[[], object]]:
    """``COMPARED`` steps of a fresh student of ``model=args.compare_model``, on the same batch."""
    overrides = [*args.overrides, f"model={args.compare_model}"]
    cfg = compose(["method=polish_teacher", *overrides])
    polish = build_method(OmegaConf.to_object(cfg.method))
    model = polish.build_model(cfg.model, data.category_map.num_classes).to(accelerator.device)
    student = apply_speed_settings(cfg.train, model)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    flags: dict[str, list] = {name: [] for name in STEPS}
    parts = training_parts(cfg, overrides, accelerator, student, teacher, labeled, unlabeled, everything, flags, RunState())
    for name in COMPARED:
        nonfinite[_other(name, args.compare_model)] = flags[name]
    return {_other(name, args.compare_model): parts[name] for name in COMPARED}


def _log_to_mlflow(args: argparse.Namespace, cfg: DictConfig, result: BenchResult) -> None:
    """One run in the ``ssod-bench`` experiment: the config, every number, and the report."""
    tracker = Tracker(default_tracking_uri(Path.cwd()), "ssod-bench")
    tracker.start(f"bench-{args.device}-{args.precision}")
    tracker.log_params({**flatten(cfg), "bench.device": args.device, "bench.precision": args.precision,
                        "bench.checkpoint": args.checkpoint or "", "bench.compare_model": args.compare_model or ""})
    tracker.log_metrics({f"bench/{_slug(k)}_s": v for k, v in result.rows.items()}, 0)
    tracker.log_metrics({f"bench/ratio/{_slug(k)}": v for k, v in result.ratios.items()}, 0)
    tracker.log_metrics({f"bench/{name}_images_per_s": value for name, value in result.speeds.items()}, 0)
    tracker.log_metrics({"bench/nonfinite_steps": sum(result.nonfinite.values())}, 0)
    tracker.log_metrics({f"bench/{_slug(k)}_images_per_s": v for k, v in result.throughput.items()}, 0)
    tracker.log_metrics({f"bench/{_slug(k)}_peak_gib": v for k, v in result.peak_gib.items()}, 0)
    tracker.log_text(result.report, "bench.md")
    tracker.end("FINISHED")


def _load_trained(path: str, student, teacher) -> tuple[str, RunState]:
    """Load a training checkpoint's student and teacher weights; returns what was loaded and
    the run's counters at that step (the teacher's EMA goes on as after a resume)."""
    found = checkpoint_file(path, "--checkpoint")
    state = load_checkpoint(found)
    load_weights(student, state["student"])
    load_weights(teacher, state["teacher"])
    counters = RunState(step=state["step"], ema_steps=state.get("ema_steps", state["step"]))
    return f"weights of {found} (step {state['step']})", counters


@torch.no_grad()
def _pseudo_label_counts(teacher, labeled, unlabeled, method, accelerator: Accelerator) -> str:
    """The teacher's pseudo labels per unlabeled image on the bench's batch (the work they cause)."""
    images = [item[0] for item in labeled]
    targets = [item[1] for item in labeled]
    with accelerator.autocast():
        out = method.teach(teacher, images, targets, [u[0].image for u in unlabeled])
    count = len(unlabeled)
    raw = sum(len(p.boxes) for p in out.pseudo_labels) / count
    kept = sum(int(p.classification_keep(method.thresholds.cls).sum()) for p in out.pseudo_labels) / count
    return f"pseudo labels per unlabeled image: {raw:.1f} raw, {kept:.1f} for classification"


def _inference(detector, images, accelerator: Accelerator):
    def run():
        with torch.no_grad(), accelerator.autocast():
            return detector(images)

    return run


def _polishing(student, teacher, labeled, unlabeled, accelerator: Accelerator):
    """Polisher training losses + backward on labeled images, then polishing of weak-view boxes."""
    detector = teacher.detector
    images, _ = detector.transform([item[0] for item in labeled] + [u[0].image for u in unlabeled])
    with torch.no_grad():
        features = detector.backbone(images.tensors)
        proposals, _ = detector.rpn(images, features)
    count = len(labeled)
    lab_features = {k: v[:count] for k, v in features.items()}
    weak_features = {k: v[count:] for k, v in features.items()}
    gt_boxes = [item[1]["boxes"] for item in labeled]
    gt_labels = [item[1]["labels"] for item in labeled]
    # Polish the (hidden) ground truth boxes of the weak views as stand-in detections.
    boxes = [gt_boxes[i % count] for i in range(len(unlabeled))]
    labels = [gt_labels[i % count] for i in range(len(unlabeled))]
    scores = [torch.full((len(b),), 0.7, device=b.device) for b in boxes]

    def run():
        with accelerator.autocast():
            losses, _ = student.polisher.losses(lab_features, gt_boxes, gt_labels, proposals[:count], images.image_sizes[:count])
            sum(losses.values()).backward()
            teacher.polisher.polish(weak_features, boxes, labels, scores, images.image_sizes[count:])
        # The next part's optimizer step must not apply (nor carry) these gradients.
        student.polisher.zero_grad(set_to_none=True)

    return run


def _mlflow_cost(args) -> float:
    """Median time to log one interval's scalars (~60 metrics) to a fresh SQLite store."""
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench")
        tracker.start("logging")
        scalars = {f"train/metric_{i}": float(i) for i in range(60)}
        step = iter(range(1, 10**6))
        seconds = median_seconds(lambda: tracker.log_metrics(scalars, next(step)), torch.device("cpu"), args.repeats, 1)
        tracker.end("FINISHED")
    return seconds


def _eval_throughput(detector, dataset, device, count: int, workers: int, rounds: int = 3) -> tuple[dict[str, float], float]:
    """Images/s of ``predict`` (loading, inference, mapping back: ``eval``), of its loader
    alone (``eval_loader``) and of the bare detector (``model``); and the seconds the loader
    takes to its first batch.

    The loader is built once and warmed up, as in training, where it persists between
    evaluations; the bare detector gets the same images already in memory, same batches.
    Evaluation and the bare detector take turns, ``rounds`` passes each (medians).
    """
    count = min(count, len(dataset))
    indices = list(range(count))
    loader = eval_loader(dataset, indices, num_workers=workers, pin_memory=device.type == "cuda")
    images = [dataset[i][0][0].to(device) for i in indices]

    @torch.no_grad()
    def bare_detector():
        for first in range(0, count, 4):
            detections_to_host(detector(images[first : first + 4]))  # predict hands back CPU tensors too

    passes = {"eval": lambda: predict(detector, loader, device), "model": bare_detector}
    seconds, _ = interleaved_medians(passes, device, rounds, warmup=1)  # the warm-up starts the workers
    # The loader alone: where it is slower than the model, evaluation waits for the data. Its
    # first batch comes after one worker has made a whole batch: a fixed cost per evaluation
    # that a short one (the bench's) feels far more than a full validation set.
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first_batch = time.perf_counter() - start
    for _ in batches:
        pass
    loader_ips = count / (time.perf_counter() - start)
    return {"eval": count / seconds["eval"], "eval_loader": loader_ips, "model": count / seconds["model"]}, first_batch


def _profile(step, device: torch.device, steps: int, rows: int = 25) -> str:
    """Where ``steps`` calls of ``step`` spend their time (torch.profiler), per step.

    Three tables: the step's named parts (``ssod::...`` ranges: host time, and on a GPU the
    device time of the kernels they launch); the top operators by self device time (GPU) or
    self host time; on a GPU also by host time. The first line compares the wall time with
    the time the GPU was busy: where the wall time is much larger, the GPU waits for Python
    and for host-device synchronisations, not for kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    _synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    lines = [f"profile of {steps} polish_teacher steps: wall {wall * 1e3:.1f} ms per step (profiler on)"]
    # On a GPU each named range appears twice: as a host range, whose device time is that of
    # the kernels its operators launched, and as a span on the GPU's timeline (idle gaps included).
    spans = {event.key: event for event in averages if _on_gpu(event) and event.is_user_annotation}
    if cuda:
        busy = sum(_device_self(event) for event in averages if _on_gpu(event) and not event.is_user_annotation) / steps / 1e3
        syncs = sum(event.count for event in averages if event.key in _SYNC_OPS) / steps
        lines[0] += f", GPU busy {busy:.1f} ms per step, {syncs:.0f} host-device syncs per step"
    parts = sorted((e for e in averages if e.key.startswith("ssod::") and not _on_gpu(e)), key=lambda e: e.key)
    lines += ["", "| part | host ms | kernels ms | GPU span ms |", "| --- | --- | --- | --- |"]
    for event in parts:
        kernels = f"{_device_total(event) / steps / 1e3:.1f}" if cuda else ""
        span = f"{_device_total(spans[event.key]) / steps / 1e3:.1f}" if event.key in spans else ""
        lines.append(f"| {event.key} | {event.cpu_time_total / steps / 1e3:.1f} | {kernels} | {span} |")
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines += ["", f"sorted by {sort_by}:", averages.table(sort_by=sort_by, row_limit=rows)]
    if cuda:
        lines += ["sorted by cpu_time_total:", averages.table(sort_by="cpu_time_total", row_limit=rows)]
    return "\n".join(lines)


# The CUDA calls in which the host waits for the device (``.item()``, ``nonzero`` and blocking
# copies all end in one of them).
_SYNC_OPS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def _on_gpu(event) -> bool:
    """A kernel, a copy, or a ``record_function`` range's span, on the GPU's timeline."""
    return event.device_type != DeviceType.CPU


def _device_self(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _device_total(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slug(text: str) -> str:
    """``"polish / soft_teacher"`` -> ``"polish_soft_teacher"`` (MLflow metric names)."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


def _table(rows, ratios, speeds, args, cfg, throughput, peak_gib) -> str:
    def cells(name: str) -> str:
        ips = f"{throughput[name]:.2f}" if name in throughput else ""
        peak = f"{peak_gib[name]:.2f}" if name in peak_gib else ""
        return f"| {name} | {rows[name]:.4f} | {ips} | {peak} |"

    lines = [
        f"device {args.device} ({_device_name(args.device)}), precision {args.precision}{_precision_note(args)}, "
        f"channels_last {cfg.train.channels_last}, tf32 {cfg.train.tf32}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {cfg.train.batch_labeled} labeled + {cfg.train.batch_unlabeled} unlabeled, "
        f"median of {args.repeats} after {args.warmup} warm-up",
        "",
        "| part | seconds | images/s | peak GiB |",
        "| --- | --- | --- | --- |",
        *[cells(name) for name in rows],
        f"| evaluation | | {speeds['eval']:.2f} | |",
        f"| evaluation loader alone | | {speeds['eval_loader']:.2f} | |",
        f"| model inference | | {speeds['model']:.2f} | |",
        "",
        "| ratio | value |",
        "| --- | --- |",
        *[f"| {name} | {value:.3f} |" for name, value in ratios.items()],
    ]
    return "\n".join(lines)


def _precision_note(args) -> str:
    return " (as in training, accelerate runs fp16 on a CPU without autocast: fp32)" if args.precision == "fp16" and args.device == "cpu" else ""


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"


if __name__ == "__main__":
    sys.exit(main())
