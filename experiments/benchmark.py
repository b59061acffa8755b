"""The method benchmark: Polishing Teacher against supervised training and Soft Teacher.

One command runs the whole protocol, resumable run by run::

    .venv/bin/python experiments/benchmark.py --profile cpu

The plan (model scored, metric, setting, seeds, plateau criterion) is written in
``experiments/results/method_benchmark.md`` before any test number; this script writes the
numbers between its markers. Protocol (``--profile`` sets the sizes; every flag overrides it):

- Data: the built-in synthetic shapes with a large unlabeled pool (``--num-train``), the
  validation split (what chooses) and a held-out **test** split (``--num-test``), evaluated
  once, at the end of each run, read only by this report. The strong view keeps boxes tight
  (no rotation or shear: they turn a tight box into a loose one and cap even the oracle).
  Labeled fractions: ``--percents`` of the train split; the first is the main setting.
- Seeds are paired: seed ``s`` fixes the labeled split (``data.fold = s + 1``) and the
  training seed, the same for every arm. Runs go seed by seed, so every run of a seed is made
  on one machine (CPUs round differently from the first step: a seed's arms made on two
  machines are no pair); a benchmark continued on another machine continues with whole seeds.
- Each (fraction, seed) first gets one supervised burn-in of ``--burn-in`` iterations
  (``method=polish_teacher`` with no unsupervised step: the detector trains as supervised
  does, the polishing networks learn beside it from the labeled images). Every arm then
  continues that checkpoint alike (``train.init_from`` + ``train.init_continue``: step,
  schedule, EMA counters, and SGD momentum matched by parameter name) for ``--iterations``
  more, its unsupervised weight ramping up over ``--unsup-warmup``; the supervised arm
  continues the same way with labeled images only.
- Arms, each at unsupervised weight 1.0: supervised, soft_teacher, polish_teacher, the oracle
  (hidden ground truth as pseudo labels through the same path: the ceiling), and at the main
  setting the ablations pt_no_polish (networks trained, neither used), pt_box_only,
  pt_cls_only. ``--ablation-seeds`` limits them.
- Each method's own learning rate for the phase after the burn-in, chosen on validation with
  the same budget for every method, by ``ssod-tune``: one study per method
  (``conf/tune/method_lr.yaml``, a journal storage in ``<outputs>/lr-selection``), every
  ``--lr-grid`` value of ``train.lr_gamma`` (the factor on the burn-in's rate from its end)
  enqueued and trained to the end, none pruned, each trial continuing the main setting's
  first seed's burn-in exactly as an arm does. The value with the best final validation
  teacher AP is that method's for every seed and fraction (the oracle and the ablations take
  polish_teacher's). The chosen trial is that seed's arm (its folder, linked: a trial trains
  exactly what the arm would, bit for bit; tests/e2e/test_benchmark_selection.py); the test AP
  of the others is never read. ``--lr-grid`` with no value skips the selection.
- The scored model is the teacher (the EMA detector, the model the paper reports), at the
  run's last step; the primary metric its COCO AP on the test split. Intervals: 95%, from a
  paired bootstrap over seeds and test images (``ssod.bootstrap``), from each run's kept test
  detections.

Output: ``<out-dir>/method_benchmark.json``: ``runs`` (one record per finished run, written
after each run; a run already recorded is skipped, an interrupted one resumes from its last
checkpoint), ``summary`` (one record per comparison: mean, ci_low, ci_high, seeds
positive) and ``lr_selection`` (the grid, each selection run's validation AP, the choice), and the table in ``<out-dir>/method_benchmark.md``. Runs land in the MLflow
experiment ``--experiment`` of the project's store. ``--jobs N`` runs N trainings side by
side (a GPU machine with many cores); each gets ``cores / N`` threads. Extra Hydra overrides
after ``--`` apply to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TESTBED = "synthetic"
# Arm -> the overrides that make it, on top of the common ones. Each names its unsupervised
# weight, so that a recipe's default cannot silently change what a recorded arm means.
PT = ["method=polish_teacher", "method.unsup_weight=1.0"]
ARMS = {
    "supervised": ["method=supervised"],
    "soft_teacher": ["method=soft_teacher", "method.unsup_weight=1.0"],
    "polish_teacher": PT,
    "oracle": [*PT, "method.pseudo_labels=oracle"],
    "pt_no_polish": [*PT, "method.polish_use=none"],
    "pt_box_only": [*PT, "method.polish_use=boxes"],
    "pt_cls_only": [*PT, "method.polish_use=categories"],
    # The paper's weights (Polishing Teacher 3, Soft Teacher 4): not in the default plan.
    "polish_teacher_paper": ["method=polish_teacher", "method.unsup_weight=3.0"],
    "soft_teacher_paper": ["method=soft_teacher", "method.unsup_weight=4.0"],
}
MAIN_ARMS = ("supervised", "polish_teacher", "soft_teacher", "oracle")
# The methods whose phase learning rate is chosen on validation (an equal budget each).
SELECTED_METHODS = ("supervised", "soft_teacher", "polish_teacher")
ABLATIONS = ("pt_no_polish", "pt_box_only", "pt_cls_only")
DEFAULT_ARMS = (*MAIN_ARMS, *ABLATIONS)
# The comparisons of the summary: (method, baseline).
COMPARISONS = (
    ("polish_teacher", "supervised"), ("polish_teacher", "soft_teacher"), ("soft_teacher", "supervised"),
    ("oracle", "supervised"), ("polish_teacher", "pt_no_polish"), ("pt_box_only", "pt_no_polish"),
    ("pt_cls_only", "pt_no_polish"), ("polish_teacher_paper", "supervised"), ("soft_teacher_paper", "supervised"),
)
# A tight strong view: no rotation, no shear (translation, photometric ops and erasing stay).
TIGHT_BOXES = ["data.strong_rotate_deg=0", "data.strong_shear_deg=0"]

PROFILES = {
    # 2 CPU cores, one run at a time: the main setting 0.5% (20 labeled images, where the
    # oracle has room: +16.7 AP in ../shared/docs/BENCHMARKS.md), then 2.5%; 5 seeds; arms of
    # 900 iterations after a 400-iteration burn-in, a validation curve every 150.
    "cpu": dict(num_train=4000, num_test=2000, percents=[0.5, 2.5], seeds=[0, 1, 2, 3, 4], burn_in=400,
                iterations=900, unsup_warmup=50, ablation_seeds=5, jobs=1, lr_grid=[0.1, 0.3, 1.0],
                extra=["train.eval_every=150", *TIGHT_BOXES]),
    # One GPU machine with 16 cores: the same protocol, 8 runs side by side.
    "gpu": dict(num_train=4000, num_test=2000, percents=[0.5, 2.5], seeds=[0, 1, 2, 3, 4], burn_in=400,
                iterations=900, unsup_warmup=50, ablation_seeds=5, jobs=8, lr_grid=[0.1, 0.3, 1.0],
                extra=["train.eval_every=150", *TIGHT_BOXES, "data.num_workers=1"]),
}

# Record field -> MLflow metric (the last value, at the run's final step).
FINAL = {
    f"{split}_{who}_{metric}": f"{split}/{who}/bbox_{metric}"
    for split in ("test", "val") for who in ("teacher", "student") for metric in ("AP", "AP50", "AP75")
}
# Pseudo-label quality against the hidden ground truth: mean over the unsupervised intervals
# (or their sum for counts).
QUALITY_MEAN = {
    "pseudo_iou_raw": "pseudo/iou_mean/raw",
    "pseudo_iou_polished": "pseudo/iou_mean/polished",
    "label_acc_raw": "pseudo/label_acc/raw",
    "label_acc_polished": "pseudo/label_acc/polished",
    "pseudo_per_image": "pseudo/num_per_image/raw",
    # Regression targets are every raw box: their precision is 1 - the unmatched share.
    "reg_precision": "pseudo/precision/raw",
    "reg_recall": "pseudo/recall/raw",
    "cls_precision": "pseudo/precision/cls",
    "cls_recall": "pseudo/recall/cls",
}
QUALITY_SUM = {"wrong_to_right": "pseudo/relabel/wrong_to_right", "right_to_wrong": "pseudo/relabel/right_to_wrong"}


@dataclass(frozen=True)
class Run:
    arm: str
    percent: float
    seed: int
    lr_gamma: float | None = None  # None: the config's

    @property
    def name(self) -> str:
        rate = "" if self.lr_gamma is None else f"-lr{self.lr_gamma:g}"
        return f"mb-{self.arm}-{self.percent:g}pct-s{self.seed}{rate}"


def lr_method(arm: str) -> str:
    """The method whose chosen phase learning rate an arm takes."""
    return arm if arm == "supervised" else "soft_teacher" if arm.startswith("soft_teacher") else "polish_teacher"


@dataclass
class Plan:
    args: argparse.Namespace
    runs: list[Run] = field(default_factory=list)

    def output_dir(self, name: str) -> Path:
        return Path(self.args.outputs) / name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--num-test", type=int)
    parser.add_argument("--percents", type=float, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), help=f"default: {' '.join(DEFAULT_ARMS)}")
    parser.add_argument("--ablation-seeds", type=int, help="ablation arms run on the first N seeds (main setting only)")
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates of each interval")
    parser.add_argument("--burn-in", type=int)
    parser.add_argument("--iterations", type=int, help="iterations of each arm after the burn-in")
    parser.add_argument("--unsup-warmup", type=int)
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--lr-grid", type=float, nargs="*",
                        help="train.lr_gamma values tried per method on validation (none: no selection)")
    parser.add_argument("--experiment", default="ssod-method-benchmark", help="MLflow experiment name")
    parser.add_argument("--out-dir", default="experiments/results")
    parser.add_argument("--outputs", default="outputs/method_benchmark", help="the runs' output folders")
    parser.add_argument("--table-only", action="store_true", help="write the table from the json, run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    for key, value in PROFILES[args.profile].items():
        if key == "extra":
            args.overrides = [*value, *args.overrides]
        elif getattr(args, key) is None:
            setattr(args, key, value)
    args.arms = args.arms or list(DEFAULT_ARMS)
    return args


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every run, in the order they go: per fraction, seed by seed (each seed whole on one
    machine), the main arms first, then the ablations (at the main setting, the first
    fraction, on the first ``--ablation-seeds`` seeds)."""
    runs = []
    for number, percent in enumerate(args.percents):
        for index, seed in enumerate(args.seeds):
            for arm in (*MAIN_ARMS, *ABLATIONS, *(a for a in ARMS if a not in DEFAULT_ARMS)):
                if arm not in args.arms or (arm in ABLATIONS and (number > 0 or index >= args.ablation_seeds)):
                    continue
                runs.append(Run(arm, percent, seed))
    return runs


def selection_runs(args: argparse.Namespace) -> list[Run]:
    """The phase-learning-rate selection: every method, every grid value, at the main setting's
    first seed (supervised first: the cheapest)."""
    return [Run(method, args.percents[0], args.seeds[0], gamma)
            for method in SELECTED_METHODS for gamma in (args.lr_grid or [])]


def arm_overrides(args: argparse.Namespace, run: Run, burn_in: Path) -> list[str]:
    """What trains ``run``: the arm's settings, continuing ``burn_in`` alike for every arm."""
    total = args.burn_in + args.iterations
    mid = args.burn_in + args.iterations // 2
    return [
        *common_overrides(args, run.percent, run.seed), *(o.format(mid=mid) for o in ARMS[run.arm]),
        *([] if run.lr_gamma is None else [f"train.lr_gamma={run.lr_gamma}"]),
        f"train.init_from={burn_in.resolve()}", "train.init_continue=true",
        f"train.iterations={total}", f"method.unsup_start={args.burn_in}", f"method.unsup_warmup={args.unsup_warmup}",
        f"train.eval_every={max(args.iterations // 2, 1)}", f"train.ckpt_every={max(args.iterations // 2, 1)}",
        *args.overrides,
    ]


def select_with_tuner(plan: Plan, threads: int) -> dict | None:
    """Each method's phase learning rate, chosen by ``ssod-tune``: one study per method
    (``conf/tune/method_lr.yaml``: every ``--lr-grid`` value enqueued and trained to the end,
    none pruned, so every method gets the same budget), its trials continuing the main
    setting's first seed's burn-in exactly as the arms do. The chosen trial's folder becomes
    that seed's arm (the trial is the arm: the same overrides). None when a study did not finish."""
    import optuna

    from ssod.tuning.storage import open_storage

    args = plan.args
    percent, seed = args.percents[0], args.seeds[0]
    burn_in = ensure_burn_in(plan, percent, seed, threads * args.jobs)
    prepare_data(args, [(percent, seed)])
    folder = Path(args.outputs).resolve() / "lr-selection"
    journal = f"journal:{folder / 'optuna.journal'}"
    choices = ", ".join(repr(float(gamma)) for gamma in args.lr_grid)  # 1.0 stays a float
    rows, studies = [], {}
    for method in SELECTED_METHODS:
        study = f"mb-lr-{method}-{percent:g}pct-s{seed}"
        base = [o for o in arm_overrides(args, Run(method, percent, seed), burn_in) if not o.startswith("train.lr_gamma=")]
        command = [sys.executable, "-m", "ssod.tune", "--workers", str(args.jobs), "--gpus", "cpu", "--storage", journal,
                   "tune=method_lr", f"tune.study_name={study}", f"tune.output_dir={folder}",
                   f"tune.n_trials={len(args.lr_grid)}",
                   f"tune.space={{train.lr_gamma: {{type: categorical, choices: [{choices}]}}}}", *base]
        status, seconds = run_logged(study, command, threads, Path(args.outputs) / "logs")
        print(f"  {study}: exit {status}, {seconds:.0f} s", flush=True)
        trials = optuna.load_study(study_name=study, storage=open_storage(journal, None, None, None)).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        by_gamma = {t.params["train.lr_gamma"]: t for t in trials}
        if sorted(by_gamma) != sorted(args.lr_grid):
            return None
        studies[method] = study
        for gamma in args.lr_grid:
            trial = by_gamma[gamma]
            final = json.loads((Path(trial.user_attrs["output_dir"]) / "final_metrics.json").read_text())
            rows.append({"method": method, "lr_gamma": gamma, "val_teacher_AP": trial.value, "trial": trial.number,
                         "output_dir": trial.user_attrs["output_dir"], "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
                         "machine": final.get("machine"),
                         "val_curve": [[step, value] for step, value in sorted(trial.intermediate_values.items())]})
    chosen = choose_lr(rows)
    for row in rows:  # the chosen trial is its method's arm at this seed
        arm = plan.output_dir(Run(row["method"], percent, seed, row["lr_gamma"]).name)
        if chosen.get(row["method"]) == row["lr_gamma"] and not arm.exists():
            arm.symlink_to(Path(row["output_dir"]), target_is_directory=True)
    return {"grid": args.lr_grid, "percent": percent, "seed": seed, "metric": "val_teacher_AP", "via": "ssod-tune",
            "storage": journal, "studies": studies, "runs": rows, "chosen": chosen}


def selection_done(selection: dict | None, args: argparse.Namespace) -> bool:
    """Whether the stored selection is ssod-tune's, over this grid."""
    return selection is not None and selection.get("grid") == args.lr_grid and selection.get("via") == "ssod-tune"


def choose_lr(entries: list[dict]) -> dict[str, float]:
    """Per method, the grid value with the highest final validation teacher AP (a tie: the
    first in the grid)."""
    chosen = {}
    for method in SELECTED_METHODS:
        rows = [e for e in entries if e["method"] == method and e.get("val_teacher_AP") is not None]
        if rows:
            chosen[method] = max(rows, key=lambda e: e["val_teacher_AP"])["lr_gamma"]
    return chosen


def with_chosen_lr(runs: list[Run], chosen: dict[str, float]) -> list[Run]:
    return [Run(run.arm, run.percent, run.seed, chosen.get(lr_method(run.arm))) for run in runs]


def common_overrides(args: argparse.Namespace, percent: float, seed: int) -> list[str]:
    return [
        # The pre-registered settings: each arm names its weight, and no later recipe choice
        # (conf/experiment_method/, e.g. a tuned default) changes what a planned arm means.
        "experiment=synthetic", "~experiment_method",
        f"data.synthetic.num_train={args.num_train}",
        f"data.synthetic.num_test={args.num_test}",
        f"data.percent={percent}",
        f"data.fold={seed + 1}",
        f"train.seed={seed}",
        "train.progress=false",
        f"tracking.experiment={args.experiment}",
    ]


def burn_in_name(percent: float, seed: int) -> str:
    return f"mb-burnin-{percent:g}pct-s{seed}"


def train(name: str, overrides: list[str], output_dir: Path, threads: int, log_dir: Path) -> None:
    """One training in a fresh process; an interrupted one resumes from its checkpoints."""
    resume = ["train.resume=auto"] if (output_dir / "checkpoints").is_dir() else []
    command = [sys.executable, "-m", "ssod.train", *overrides, f"train.run_name={name}",
               f"train.output_dir={output_dir}", *resume]
    status, seconds = run_logged(name, command, threads, log_dir)
    if status != 0:
        raise RuntimeError(f"{name} failed (exit {status}); see {log_dir / f'{name}.log'}")
    print(f"  {name}: {seconds:.0f} s", flush=True)


def run_logged(name: str, command: list[str], threads: int, log_dir: Path) -> tuple[int, float]:
    """Run ``command`` with ``threads`` threads, its output appended to ``<log_dir>/<name>.log``;
    returns its exit status and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_dir.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "a") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return result.returncode, time.perf_counter() - started


def prepare_data(args: argparse.Namespace, keys: list[tuple[float, int]]) -> None:
    """Generate the dataset and every labeled split once, here, before runs start side by
    side (each would otherwise draw its own copy of the images)."""
    from omegaconf import OmegaConf

    from ssod.config import compose
    from ssod.data.pipeline import resolve_files

    for percent, seed in keys:
        cfg = compose([*common_overrides(args, percent, seed), *args.overrides])
        files = resolve_files(OmegaConf.to_object(cfg.data), Path.cwd())
        args.test_json = str(files.test_json)


def ensure_burn_in(plan: Plan, percent: float, seed: int, threads: int) -> Path:
    """The shared supervised burn-in of one (fraction, seed): its final checkpoint."""
    args = plan.args
    name = burn_in_name(percent, seed)
    output_dir = plan.output_dir(name)
    final = output_dir / "checkpoints" / f"step-{args.burn_in:08d}.pt"
    if not final.is_file():
        # One evaluation, on validation, at its end: it only feeds the arms (the profile's
        # eval_every is for their curves; the test split is theirs to read).
        train(name, [
            *common_overrides(args, percent, seed), "method=polish_teacher",
            f"train.iterations={args.burn_in}", f"method.unsup_start={args.burn_in}", *args.overrides,
            f"train.eval_every={args.burn_in}", f"train.ckpt_every={args.burn_in}", "train.evaluate_test=false",
        ], output_dir, threads, Path(args.outputs) / "logs")
    return final


def run_arm(plan: Plan, run: Run, burn_in: Path, threads: int) -> dict:
    args = plan.args
    total = args.burn_in + args.iterations
    overrides = arm_overrides(args, run, burn_in)
    try:  # finished before its record was written (the benchmark was stopped in between)
        return record(plan, run, total)
    except LookupError:
        pass
    train(run.name, overrides, plan.output_dir(run.name), threads, Path(args.outputs) / "logs")
    return record(plan, run, total)


def record(plan: Plan, run: Run, iterations: int) -> dict:
    """The json record of a finished run: its ``final_metrics.json`` and, with tracking on,
    the pseudo-label quality over all its unsupervised intervals from MLflow (with tracking
    off, the last interval's). Raises LookupError when the run has not finished."""
    args = plan.args
    path = plan.output_dir(run.name) / "final_metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if metrics.get("step") != iterations:
        raise LookupError(f"{run.name}: not finished ({path})")
    entry = {"testbed": TESTBED, "arm": run.arm, "method": ARMS[run.arm][0].split("=")[1], "percent": run.percent,
             "seed": run.seed, "lr_gamma": run.lr_gamma, "model_scored": "teacher", "test_AP": metrics.get("test/teacher/bbox_AP"),
             "iterations": iterations, "burn_in": args.burn_in, "mlflow_run_id": metrics.get("mlflow_run_id"),
             "labeled_images": metrics.get("data/train/images"),
             # Written by the run itself: the machine that trained it, not the one collecting.
             "machine": metrics.get("machine")}
    entry.update({key: metrics.get(metric) for key, metric in FINAL.items()})
    entry["detections"] = str(plan.output_dir(run.name) / "test_detections" / "teacher.json.gz")
    entry["test_json"] = getattr(args, "test_json", None)
    histories = _histories(args, entry["mlflow_run_id"])
    entry["val_curve"] = [[step, value] for step, value in (histories or {}).get(VAL_CURVE, [])]
    for key, metric in {**QUALITY_MEAN, **QUALITY_SUM}.items():
        if histories is None:
            value = metrics.get(metric, metrics.get(_old_name(metric)))
            entry[key] = None if value is None or math.isnan(value) else value
            continue
        values = [v for step, v in histories.get(metric, []) if step > args.burn_in and not math.isnan(v)]
        summary = sum if key in QUALITY_SUM else statistics.fmean
        entry[key] = summary(values) if values else None
    return entry


VAL_CURVE = "val/teacher/bbox_AP"


def _histories(args: argparse.Namespace, run_id: str | None) -> dict[str, list[tuple[int, float]]] | None:
    if not run_id or "tracking.enabled=false" in args.overrides:
        return None
    from mlflow.tracking import MlflowClient

    from ssod.mlflow_client import default_tracking_uri

    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.uri=")]
    client = MlflowClient(given[-1] if given else default_tracking_uri(Path.cwd()))
    histories = {}
    for metric in (*QUALITY_MEAN.values(), *QUALITY_SUM.values(), VAL_CURVE):
        # A run logged before the pseudo-label quality's rename has it under the old name.
        histories[metric] = [(m.step, m.value) for name in dict.fromkeys((metric, _old_name(metric)))
                             for m in client.get_metric_history(run_id, name)]
    return histories


def _old_name(metric: str) -> str:
    """The name runs logged ``metric`` under before ``ssod.evaluation.RENAMED_PSEUDO`` (itself when not renamed)."""
    from ssod.evaluation import RENAMED_PSEUDO

    return {new: old for old, new in RENAMED_PSEUDO.items()}.get(metric, metric)


def run_key(record: dict) -> str:
    return Run(record["arm"], record["percent"], record["seed"], record.get("lr_gamma")).name


def load_results(path: Path) -> tuple[dict[str, dict], list[dict]]:
    """``(runs by name, summary)`` of a results json; an older list-only file has no summary."""
    if not path.is_file():
        return {}, []
    document = json.loads(path.read_text())
    runs = document if isinstance(document, list) else document["runs"]
    return {run_key(r): r for r in runs}, ([] if isinstance(document, list) else document.get("summary", []))


def load_selection(path: Path) -> dict | None:
    """The json's ``lr_selection`` (None before the selection has finished)."""
    return json.loads(path.read_text()).get("lr_selection") if path.is_file() else None


def save_results(path: Path, records: dict[str, dict], summary: list[dict], set_aside: list[dict] = (),
                 selection: dict | None = None) -> None:
    """Write the json; ``set_aside`` records join its ``superseded`` list (kept, never dropped);
    the stored ``lr_selection`` stays unless ``selection`` replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    old = old if isinstance(old, dict) else {}
    document = {"runs": sorted(records.values(), key=lambda r: (r["percent"], r["seed"], r["arm"])), "summary": summary,
                "superseded": [*old.get("superseded", []), *set_aside]}
    if selection or old.get("lr_selection"):
        document["lr_selection"] = selection or old["lr_selection"]
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1))
    os.replace(temporary, path)


def cpu_of(machine: str | None) -> str | None:
    """The part of a machine description that decides the rounding (CPU model, cores, AVX-512),
    without the host name."""
    return None if machine is None else machine.split(": ", 1)[-1]


def set_aside_other_machines(records: dict[str, dict], todo: list[Run], here: str) -> list[dict]:
    """A seed whose remaining arms run here, with arms already recorded on another CPU, cannot
    be paired (CPUs round differently from the first step): its old records are moved to the
    json's ``superseded`` list (never dropped) and the whole seed runs again here. Complete
    seeds are kept whatever machine made them. Returns the records set aside."""
    pending = {(run.percent, run.seed) for run in todo}
    moved = []
    for name, record in list(records.items()):
        if (record["percent"], record["seed"]) in pending and cpu_of(record.get("machine")) not in (None, cpu_of(here)):
            moved.append({**records.pop(name), "superseded_because": f"its seed continues on another CPU ({cpu_of(here)})"})
    return moved


def summarize(records: list[dict], replicates: int, previous: list[dict]) -> list[dict]:
    """One record per (testbed, fraction, comparison) whose two arms share seeds: the mean
    paired difference of test AP (the scored model's), its 95% bootstrap interval over seeds
    and test images, per-seed values. Comparisons whose detection files are not on this
    machine keep their previous record (the runs' files stay where they were made)."""
    from ssod.bootstrap import DetectionFiles, paired_bootstrap

    kept = {(s["testbed"], s["percent"], s["comparison"]): s for s in previous}
    files = DetectionFiles()

    def matches(record: dict):
        return files.matches(record["detections"], record["test_json"])

    summary = []
    for testbed, percent in sorted({(r["testbed"], r["percent"]) for r in records}):
        rows = [r for r in records if (r["testbed"], r["percent"]) == (testbed, percent)]
        for method, baseline in COMPARISONS:
            by_seed = {arm: {r["seed"]: r for r in rows if r["arm"] == arm} for arm in (method, baseline)}
            seeds = sorted(set(by_seed[method]) & set(by_seed[baseline]))
            if not seeds:
                continue
            name = f"{method}-{baseline}"
            pairs = [(by_seed[method][s], by_seed[baseline][s]) for s in seeds]
            if not all(Path(r.get("detections", "")).is_file() and r.get("test_json") for pair in pairs for r in pair):
                if (testbed, percent, name) in kept:
                    summary.append(kept[(testbed, percent, name)])
                continue
            interval = paired_bootstrap({s: (matches(a), matches(b)) for s, (a, b) in zip(seeds, pairs)},
                                        replicates=replicates)
            summary.append({"testbed": testbed, "percent": percent, "comparison": name, "metric": "test_AP",
                            "model_scored": "teacher", "mean": interval.mean, "ci_low": interval.ci_low,
                            "ci_high": interval.ci_high, "seeds": interval.seeds, "positive": interval.positive,
                            "per_seed": {str(s): v for s, v in interval.per_seed.items()}, "replicates": replicates})
    return summary


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def paired(records: list[dict], arm: str, baseline: str, key: str) -> str:
    """Mean ± std of arm - baseline over the seeds both have, and how many are positive."""
    by_seed = {r["seed"]: r for r in records if r["arm"] == baseline}
    diffs = [100 * (r[key] - by_seed[r["seed"]][key]) for r in records
             if r["arm"] == arm and r["seed"] in by_seed and r.get(key) is not None and by_seed[r["seed"]].get(key) is not None]
    if not diffs:
        return "-"
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{statistics.fmean(diffs):+.1f}{spread} ({sum(d > 0 for d in diffs)}/{len(diffs)} > 0)"


def plateau(group: list[dict], tolerance: float = 0.01) -> str:
    """The plateau criterion of the plan: the seeds' mean validation teacher AP moved by less
    than ``tolerance`` (1 AP) between the last two evaluations. Returns the curve (mean over
    the seeds that have every point) and the verdict."""
    curves = [dict(map(tuple, r.get("val_curve") or [])) for r in group]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
    if len(steps) < 2:
        return "-"
    means = [statistics.fmean(c[step] for c in curves) for step in steps]
    verdict = "plateau" if abs(means[-1] - means[-2]) < tolerance else "still moving"
    return " ".join(f"{100 * m:.1f}" for m in means) + f" ({verdict})"


def table(records: list[dict], summary: list[dict]) -> str:
    lines = []
    for percent in sorted({r["percent"] for r in records}):
        rows = [r for r in records if r["percent"] == percent]
        labeled = rows[0].get("labeled_images")
        lines += [f"\n### {percent:g}% labeled ({labeled:.0f} images)\n" if labeled else f"\n### {percent:g}% labeled\n",
                  "| arm | seeds | test teacher AP | AP50 | AP75 | test student AP | val teacher AP | "
                  "teacher AP - supervised (paired) | val curve (teacher AP, mean) |",
                  "|" + " --- |" * 9]
        for arm in ARMS:
            group = [r for r in rows if r["arm"] == arm]
            if not group:
                continue
            column = lambda key: mean_std([r.get(key) for r in group])  # noqa: E731
            versus = "" if arm == "supervised" else paired(rows, arm, "supervised", "test_teacher_AP")
            lines.append(f"| {arm} | {len(group)} | {column('test_teacher_AP')} | {column('test_teacher_AP50')} | "
                         f"{column('test_teacher_AP75')} | {column('test_student_AP')} | {column('val_teacher_AP')} | "
                         f"{versus} | {plateau(group)} |")
        lines += ["", "Paired differences of test teacher AP with 95% bootstrap intervals (seeds and test images):", "",
                  "| comparison | seeds | mean | 95% interval | seeds > 0 |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['comparison']} | {s['seeds']} | {100 * s['mean']:+.2f} | "
                  f"[{100 * s['ci_low']:+.2f}, {100 * s['ci_high']:+.2f}] | {s['positive']}/{s['seeds']} |"
                  for s in summary if s["percent"] == percent]
        lines += derived_claims(records, summary, percent)
        lines += ["", "Pseudo labels against the unlabeled images' hidden ground truth (mean over the unsupervised "
                  "log intervals and seeds; regression targets are every raw box):", "",
                  "| arm | per image | regression precision / recall | classification precision / recall | "
                  "IoU raw → polished | label acc raw → polished | wrong→right / right→wrong |",
                  "|" + " --- |" * 7]
        for arm in ARMS:
            group = [r for r in rows if r["arm"] == arm and r.get("reg_precision") is not None]
            if group and arm != "supervised":
                lines.append(f"| {arm} | {_mean(group, 'pseudo_per_image', 1)} | "
                             f"{_mean(group, 'reg_precision')} / {_mean(group, 'reg_recall')} | "
                             f"{_mean(group, 'cls_precision')} / {_mean(group, 'cls_recall')} | "
                             f"{_mean(group, 'pseudo_iou_raw')} → {_mean(group, 'pseudo_iou_polished')} | "
                             f"{_mean(group, 'label_acc_raw')} → {_mean(group, 'label_acc_polished')} | "
                             f"{_mean(group, 'wrong_to_right', 0)} / {_mean(group, 'right_to_wrong', 0)} |")
    return "\n".join(lines)


def derived_claims(records: list[dict], summary: list[dict], percent: float) -> list[str]:
    """The share of the oracle's gain that Polishing Teacher reaches, and its gain as labeled
    images saved: how many labeled images supervised training needs to match it, read off the
    supervised test AP at this fraction and the next larger one (log-linear in the count, per
    seed, the seeds' median; only inside the measured range)."""
    lines = []
    by = {s["comparison"]: s for s in summary if s["percent"] == percent}
    method, oracle = by.get("polish_teacher-supervised"), by.get("oracle-supervised")
    if method and oracle and oracle["mean"] > 0:
        lines.append(f"\nShare of the oracle's gain: {100 * method['mean'] / oracle['mean']:.0f}% "
                     f"({100 * method['mean']:+.2f} of {100 * oracle['mean']:+.2f} AP).")
    larger = sorted(r["percent"] for r in records if r["percent"] > percent and r["arm"] == "supervised")
    if not larger:
        return lines
    def test_ap(arm: str, at: float) -> dict[int, dict]:  # noqa: E306
        return {r["seed"]: r for r in records if r["arm"] == arm and r["percent"] == at and r.get("test_AP") is not None}
    low, high, ours = test_ap("supervised", percent), test_ap("supervised", larger[0]), test_ap("polish_teacher", percent)
    needed = []
    for seed in sorted(set(low) & set(high) & set(ours)):
        (n0, a0), (n1, a1) = ((r["labeled_images"], r["test_AP"]) for r in (low[seed], high[seed]))
        target = ours[seed]["test_AP"]
        if a1 > a0 and a0 <= target <= a1:
            needed.append(math.exp(math.log(n0) + (target - a0) / (a1 - a0) * (math.log(n1) - math.log(n0))))
        else:
            needed.append(math.nan if target > a1 else n0)
    if needed:
        inside = sorted(n for n in needed if not math.isnan(n))
        above = sum(math.isnan(n) for n in needed)
        median = f"{statistics.median(inside):.0f}" if inside else "-"
        lines.append(f"Labeled images supervised training needs to match polish_teacher's test AP (log-linear between "
                     f"{percent:g}% and {larger[0]:g}%): median {median} over {len(inside)} seeds"
                     + (f"; on {above} seeds more than the larger fraction holds" if above else "") + ".")
    return lines


def selection_table(selection: dict | None) -> str:
    """Each method's phase learning rate: the validation AP of every grid value, the choice."""
    if not selection:
        return ""
    grid = selection["grid"]
    lines = [f"\n### Phase learning rate, chosen on validation ({selection['percent']:g}% labeled, seed "
             f"{selection['seed']}, final validation teacher AP)\n",
             "| method | " + " | ".join(f"lr_gamma {g:g}" for g in grid) + " | chosen |", "|" + " --- |" * (len(grid) + 2)]
    for method in SELECTED_METHODS:
        by_gamma = {r["lr_gamma"]: r.get("val_teacher_AP") for r in selection["runs"] if r["method"] == method}
        cells = [f"{100 * by_gamma[g]:.1f}" if by_gamma.get(g) is not None else "-" for g in grid]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {selection['chosen'].get(method, '-')} |")
    return "\n".join(lines) + "\n"


def _mean(group: list[dict], key: str, digits: int = 3) -> str:
    values = [r[key] for r in group if r.get(key) is not None]
    return f"{statistics.fmean(values):.{digits}f}" if values else "-"


# The generated part of method_benchmark.md lies between these two lines. Text a person adds
# outside them (which machine, which invocations, what to read) is kept on every rewrite.
GENERATED_BEGIN = "<!-- generated by experiments/benchmark.py from method_benchmark.json; text outside these markers is kept -->"
GENERATED_END = "<!-- end of the generated part -->"


def write_markdown(args: argparse.Namespace, records: list[dict], summary: list[dict], path: Path,
                   wall: float | None, selection: dict | None = None) -> str:
    """Write the table into ``path``: between the markers of an existing file (keeping what
    surrounds them), or as a new file. A file without the markers, edited by hand, is kept
    beside as ``<name>.before-markers`` before it is replaced."""
    command = "python experiments/benchmark.py " + shlex.join(sys.argv[1:])
    made = (f"Table written from the records by `{command}`." if args.table_only else f"Command: `{command}`")
    generated = (
        f"{GENERATED_BEGIN}\n{made}\n\n"
        f"Protocol: {args.num_train} train images split into labeled/unlabeled per seed, a held-out test split of "
        f"{args.num_test} images (AP columns are on it unless marked val), supervised burn-in of {args.burn_in} "
        f"iterations per (fraction, seed) shared by every arm, then {args.iterations} iterations per arm "
        f"(unsupervised weight ramped over {args.unsup_warmup}); overrides for every run: "
        f"`{' '.join(args.overrides) or '-'}`. AP in percent; ± is the standard deviation over seeds; paired "
        "differences are per seed (same split, same burn-in); the intervals resample seeds and test images.\n"
        + (f"\nWall time of this invocation: {wall / 60:.0f} min on {os.cpu_count()} CPU cores.\n" if wall else "")
        + selection_table(selection) + table(records, summary) + f"\n{GENERATED_END}"
    )
    before, after = "# Method benchmark (synthetic shapes)\n\n", "\n"
    old = path.read_text() if path.is_file() else None
    if old is not None and GENERATED_BEGIN in old and GENERATED_END in old.split(GENERATED_BEGIN, 1)[1]:
        before, rest = old.split(GENERATED_BEGIN, 1)
        after = rest.split(GENERATED_END, 1)[1]
    elif old is not None:
        kept = path.with_name(path.name + ".before-markers")
        kept.write_text(old)
        print(f"{path} has no generated-part markers: its old text is kept in {kept}", file=sys.stderr)
    text = before + generated + after
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    json_path, md_path = out_dir / "method_benchmark.json", out_dir / "method_benchmark.md"
    records, summary = load_results(json_path)
    selection = load_selection(json_path)
    started = time.perf_counter()
    failed = []
    if not args.table_only:
        from ssod.tracking import machine_description

        threads = max((os.cpu_count() or 1) // args.jobs, 1)
        locks: dict[tuple[float, int], threading.Lock] = {}

        def burn_in_then_arm(plan: Plan, run: Run) -> dict:
            # A burn-in is trained by the first arm of its (fraction, seed) that needs it, so
            # that one job goes seed by seed; arms side by side wait for it rather than train it twice.
            with locks.setdefault((run.percent, run.seed), threading.Lock()):
                burn_in = ensure_burn_in(plan, run.percent, run.seed, threads)
            return run_arm(plan, run, burn_in, threads)

        def run_all(plan: Plan, runs: list[Run], done) -> None:
            prepare_data(args, sorted({(run.percent, run.seed) for run in runs}))
            with ThreadPoolExecutor(args.jobs) as pool:
                futures = {pool.submit(burn_in_then_arm, plan, run): run for run in runs}
                for future, run in futures.items():
                    try:
                        done(run, future.result())
                    except Exception as error:  # the others go on; the failure is reported at the end
                        failed.append(f"{run.name}: {error}")

        plan = Plan(args, plan_runs(args))
        wanted = selection_runs(args)
        if wanted and not selection_done(selection, args):
            print(f"choosing each method's phase learning rate on validation with ssod-tune: train.lr_gamma in "
                  f"{args.lr_grid}, {len(wanted)} trials", flush=True)
            made = select_with_tuner(plan, threads)
            if made is not None:
                selection = made
                save_results(json_path, records, summary, selection=selection)
                print(f"chosen: {selection['chosen']}", flush=True)
        if wanted and not selection_done(selection, args):
            print("the learning-rate selection did not finish; no arm runs before it (run the command again):\n  "
                  + "\n  ".join(failed), file=sys.stderr)
            return 1
        plan.runs = with_chosen_lr(plan.runs, selection["chosen"] if wanted else {})
        todo = [run for run in plan.runs if run.name not in records]
        moved = set_aside_other_machines(records, todo, machine_description())
        if moved:
            print("set aside (recorded on another CPU; their seeds run again here): "
                  + ", ".join(run_key(r) for r in moved), flush=True)
            save_results(json_path, records, summary, moved)
            todo = [run for run in plan.runs if run.name not in records]
        print(f"{len(plan.runs)} runs planned, {len(plan.runs) - len(todo)} already recorded in {json_path}", flush=True)

        def keep(run: Run, entry: dict) -> None:
            records[run.name] = entry
            save_results(json_path, records, summary)

        run_all(plan, todo, keep)
        if failed:
            print("failed runs (run the command again to retry them):\n  " + "\n  ".join(failed), file=sys.stderr)
    summary = summarize(list(records.values()), args.replicates, summary)
    save_results(json_path, records, summary)
    wall = None if args.table_only else time.perf_counter() - started
    print(write_markdown(args, list(records.values()), summary, md_path, wall, selection))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
