"""The method benchmark: Polishing Teacher against supervised training and Soft Teacher.

One command runs the whole protocol, resumable run by run::

    .venv/bin/python experiments/benchmark.py --profile cpu

Protocol (``--profile`` sets the sizes; every flag below overrides it):

- Data: the built-in synthetic shapes with a larger unlabeled pool (``--num-train``) and a
  held-out **test** split (``--num-test``) read once at the end of each run, never for
  tuning or for choosing a checkpoint; the validation split is what the recipes were
  tuned on. Labeled fractions: ``--percents`` of the train split.
- Seeds are paired: seed ``s`` fixes the labeled split (``data.fold = s + 1``) and the
  training seed, the same for every arm.
- Each (fraction, seed) first gets one supervised burn-in of ``--burn-in`` iterations
  (``method=polish_teacher`` with no unsupervised step: the detector trains as supervised
  does, the polishing networks learn beside it from the labeled images). Every arm then
  continues that checkpoint's schedule (``train.init_from`` + ``train.init_continue``:
  step, learning rate, EMA counters) for ``--iterations`` more, its unsupervised weight
  ramping up over ``--unsup-warmup``. The supervised arm continues the same way with
  labeled images only, so every arm gets the same labeled batches and schedule.
- Arms: supervised, soft_teacher, polish_teacher, the ablations pt_no_polish (networks
  trained, neither used), pt_box_only, pt_cls_only, and the oracle at weights 3 and 1 (hidden ground truth
  as pseudo labels through the same path; a diagnostic, first seed only). ``--ablation-seeds``
  limits the ablations to the first seeds.
- Tuning, with the same budget for every method: each of supervised, soft_teacher and
  polish_teacher also runs one alternative (``VARIANTS``: for supervised its own knob, the
  learning rate's step; for the two semi-supervised methods the unsupervised weight), on
  every seed. The table names, per method, the variant with the higher mean **validation**
  teacher AP, and compares the chosen ones on the test split.

Output: ``<out-dir>/method_benchmark.json`` (one record per finished run, written after
each run; a run already recorded is skipped, an interrupted one resumes from its last
checkpoint) and ``<out-dir>/method_benchmark.md`` (mean +- std over seeds and the paired
differences; what a person writes around its generated part is kept). Runs land in the MLflow experiment ``--experiment`` of the project's store.
``--jobs N`` runs N trainings side by side (a GPU machine with many cores); each gets
``cores / N`` threads. Extra Hydra overrides after ``--`` apply to every run.
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Arm -> the overrides that make it, on top of the common ones. Each names its unsupervised
# weight, so that a recipe's default (conf/experiment_method/) cannot change what an arm
# means: the paper's weights (Polishing Teacher 3, Soft Teacher 4) and the alternative 1.
PT = ["method=polish_teacher", "method.unsup_weight=3.0"]
ARMS = {
    "supervised": ["method=supervised"],
    "soft_teacher": ["method=soft_teacher", "method.unsup_weight=4.0"],
    "polish_teacher": PT,
    "pt_no_polish": [*PT, "method.polish_use=none"],
    "pt_box_only": [*PT, "method.polish_use=boxes"],
    "pt_cls_only": [*PT, "method.polish_use=categories"],
    "oracle": [*PT, "method.pseudo_labels=oracle"],
    # The oracle at the weight the tuning chose (1): the ceiling of polish_teacher_w1.
    "oracle_w1": ["method=polish_teacher", "method.unsup_weight=1.0", "method.pseudo_labels=oracle"],
    # The alternatives the tuning chooses from (see VARIANTS). {mid}: the middle of the arms'
    # iterations (supervised: the x0.1 step there instead of at the burn-in's end).
    "supervised_lr_mid": ["method=supervised", "train.lr_steps=[{mid}]"],
    "soft_teacher_w1": ["method=soft_teacher", "method.unsup_weight=1.0"],
    "polish_teacher_w1": ["method=polish_teacher", "method.unsup_weight=1.0"],
}
MAIN_ARMS = ("supervised", "soft_teacher", "polish_teacher")
# Per method, the configurations its tuning chooses from on the validation split: its
# default and one alternative each (one knob, two values: the same budget for all).
VARIANTS = {
    "supervised": ("supervised", "supervised_lr_mid"),
    "soft_teacher": ("soft_teacher", "soft_teacher_w1"),
    "polish_teacher": ("polish_teacher", "polish_teacher_w1"),
}
TUNED_ARMS = tuple(arm for arms in VARIANTS.values() for arm in arms[1:])
ABLATIONS = ("pt_no_polish", "pt_box_only", "pt_cls_only")
ORACLES = ("oracle", "oracle_w1")

PROFILES = {
    # 2 CPU cores: one run at a time, a reduced grid (about 100 minutes).
    "cpu": dict(num_train=4000, num_test=500, percents=[2.5], seeds=[0, 1, 2], burn_in=400, iterations=300,
                unsup_warmup=50, ablation_seeds=1, jobs=1, extra=[]),
    # 2 CPU cores, three times the arms' iterations (900 after the 400 of the burn-in) and a
    # validation curve every 150: the unlabeled images' effect grows with the unsupervised
    # phase (experiments/results/method_benchmark_long/). About 30 min a seed for supervised,
    # soft_teacher_w1 and polish_teacher_w1.
    "cpu-long": dict(num_train=4000, num_test=500, percents=[2.5], seeds=[0, 1, 2], burn_in=400, iterations=900,
                     unsup_warmup=50, ablation_seeds=1, jobs=1, extra=["train.eval_every=150"]),
    # One H200 and 16 cores: the full grid, 8 runs side by side, in about 8 minutes.
    "gpu": dict(num_train=4000, num_test=500, percents=[2.5, 10.0], seeds=[0, 1, 2], burn_in=400, iterations=300,
                unsup_warmup=50, ablation_seeds=3, jobs=8, extra=["data.num_workers=1"]),
}

# Record field -> MLflow metric (the last value, at the run's final step).
FINAL = {
    f"{split}_{who}_{metric}": f"{split}/{who}/bbox_{metric}"
    for split in ("test", "val") for who in ("teacher", "student") for metric in ("AP", "AP50", "AP75")
}
# Pseudo-label quality against the hidden ground truth: mean over the unsupervised intervals
# (or their sum for counts).
QUALITY_MEAN = {
    "pseudo_iou_raw": "pseudo/raw/iou_mean",
    "pseudo_iou_polished": "pseudo/polished/iou_mean",
    "label_acc_raw": "pseudo/raw/label_acc",
    "label_acc_polished": "pseudo/polished/label_acc",
    "pseudo_per_image": "pseudo/raw/num_per_image",
    "pseudo_recall_raw": "pseudo/raw/recall",
}
QUALITY_SUM = {"wrong_to_right": "pseudo/relabel/wrong_to_right", "right_to_wrong": "pseudo/relabel/right_to_wrong"}


@dataclass(frozen=True)
class Run:
    arm: str
    percent: float
    seed: int

    @property
    def name(self) -> str:
        return f"mb-{self.arm}-{self.percent:g}pct-s{self.seed}"


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
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="default: all")
    parser.add_argument("--ablation-seeds", type=int, help="ablation arms run on the first N seeds")
    parser.add_argument("--burn-in", type=int)
    parser.add_argument("--iterations", type=int, help="iterations of each arm after the burn-in")
    parser.add_argument("--unsup-warmup", type=int)
    parser.add_argument("--jobs", type=int)
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
    args.arms = args.arms or list(ARMS)
    return args


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every run, in the order they go: per fraction the main arms over all seeds, then the
    oracle, then the ablations (a benchmark stopped early has the main comparison first)."""
    runs = []
    for percent in args.percents:
        order = [arm for arm in (*MAIN_ARMS, *TUNED_ARMS, *ORACLES, *ABLATIONS) if arm in args.arms]
        for arm in order:
            seeds = args.seeds[:1] if arm in ORACLES else args.seeds[: args.ablation_seeds] if arm in ABLATIONS else args.seeds
            runs += [Run(arm, percent, seed) for seed in seeds]
    return runs


def common_overrides(args: argparse.Namespace, percent: float, seed: int) -> list[str]:
    return [
        "experiment=synthetic",
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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_dir.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "a") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {result.returncode}); see {log_dir / f'{name}.log'}")
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)


def prepare_data(args: argparse.Namespace, keys: list[tuple[float, int]]) -> None:
    """Generate the dataset and every labeled split once, here, before runs start side by
    side (each would otherwise draw its own copy of the images)."""
    from omegaconf import OmegaConf

    from ssod.config import compose
    from ssod.data.pipeline import resolve_files

    for percent, seed in keys:
        cfg = compose([*common_overrides(args, percent, seed), *args.overrides])
        resolve_files(OmegaConf.to_object(cfg.data), Path.cwd())


def ensure_burn_in(plan: Plan, percent: float, seed: int, threads: int) -> Path:
    """The shared supervised burn-in of one (fraction, seed): its final checkpoint."""
    args = plan.args
    name = burn_in_name(percent, seed)
    output_dir = plan.output_dir(name)
    final = output_dir / "checkpoints" / f"step-{args.burn_in:08d}.pt"
    if not final.is_file():
        train(name, [
            *common_overrides(args, percent, seed), "method=polish_teacher",
            f"train.iterations={args.burn_in}", f"method.unsup_start={args.burn_in}",
            f"train.eval_every={args.burn_in}", f"train.ckpt_every={args.burn_in}", *args.overrides,
        ], output_dir, threads, Path(args.outputs) / "logs")
    return final


def run_arm(plan: Plan, run: Run, burn_in: Path, threads: int) -> dict:
    args = plan.args
    total = args.burn_in + args.iterations
    mid = args.burn_in + args.iterations // 2
    overrides = [
        *common_overrides(args, run.percent, run.seed), *(o.format(mid=mid) for o in ARMS[run.arm]),
        f"train.init_from={burn_in.resolve()}", "train.init_continue=true",
        f"train.iterations={total}", f"method.unsup_start={args.burn_in}", f"method.unsup_warmup={args.unsup_warmup}",
        f"train.eval_every={max(args.iterations // 2, 1)}", f"train.ckpt_every={max(args.iterations // 2, 1)}",
        *args.overrides,
    ]
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
    entry = {"arm": run.arm, "method": ARMS[run.arm][0].split("=")[1], "percent": run.percent, "seed": run.seed,
             "iterations": iterations, "burn_in": args.burn_in, "mlflow_run_id": metrics.get("mlflow_run_id"),
             "labeled_images": metrics.get("data/train/images"),
             # Written by the run itself: the machine that trained it, not the one collecting.
             "machine": metrics.get("machine")}
    entry.update({key: metrics.get(metric) for key, metric in FINAL.items()})
    histories = _quality_histories(args, entry["mlflow_run_id"])
    for key, metric in {**QUALITY_MEAN, **QUALITY_SUM}.items():
        if histories is None:
            value = metrics.get(metric)
            entry[key] = None if value is None or math.isnan(value) else value
            continue
        values = [v for step, v in histories.get(metric, []) if step > args.burn_in and not math.isnan(v)]
        summary = sum if key in QUALITY_SUM else statistics.fmean
        entry[key] = summary(values) if values else None
    return entry


def _quality_histories(args: argparse.Namespace, run_id: str | None) -> dict[str, list[tuple[int, float]]] | None:
    if not run_id or "tracking.enabled=false" in args.overrides:
        return None
    from mlflow.tracking import MlflowClient

    from ssod.tracking import default_tracking_uri

    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.uri=")]
    client = MlflowClient(given[-1] if given else default_tracking_uri(Path.cwd()))
    return {metric: [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
            for metric in {**QUALITY_MEAN, **QUALITY_SUM}.values()}


def load_records(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {f"mb-{r['arm']}-{r['percent']:g}pct-s{r['seed']}": r for r in json.loads(path.read_text())}


def save_records(path: Path, records: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(sorted(records.values(), key=lambda r: (r["percent"], r["arm"], r["seed"])), indent=1))
    os.replace(temporary, path)


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
             if r["arm"] == arm and r["seed"] in by_seed and r[key] is not None and by_seed[r["seed"]][key] is not None]
    if not diffs:
        return "-"
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{statistics.fmean(diffs):+.1f}{spread} ({sum(d > 0 for d in diffs)}/{len(diffs)} > 0)"


def table(records: list[dict]) -> str:
    lines = []
    for percent in sorted({r["percent"] for r in records}):
        rows = [r for r in records if r["percent"] == percent]
        labeled = rows[0].get("labeled_images")
        lines += [f"\n### {percent:g}% labeled ({labeled:.0f} images)\n" if labeled else f"\n### {percent:g}% labeled\n",
                  "| arm | seeds | test teacher AP | AP50 | AP75 | test student AP | val teacher AP | "
                  "teacher AP - supervised (paired) | AP75 - supervised | IoU raw → polished | "
                  "label acc raw → polished | wrong→right / right→wrong |",
                  "|" + " --- |" * 12]
        for arm in ARMS:
            group = [r for r in rows if r["arm"] == arm]
            if not group:
                continue
            column = lambda key: mean_std([r[key] for r in group])  # noqa: E731
            quality = lambda key: statistics.fmean([r[key] for r in group if r[key] is not None])  # noqa: E731
            has = lambda key: any(r[key] is not None for r in group)  # noqa: E731
            iou = f"{quality('pseudo_iou_raw'):.3f} → {quality('pseudo_iou_polished'):.3f}" if has("pseudo_iou_polished") else (
                f"{quality('pseudo_iou_raw'):.3f}" if has("pseudo_iou_raw") else "-")
            acc = f"{quality('label_acc_raw'):.3f} → {quality('label_acc_polished'):.3f}" if has("label_acc_polished") else "-"
            relabels = (f"{sum(r['wrong_to_right'] or 0 for r in group) / len(group):.0f} / "
                        f"{sum(r['right_to_wrong'] or 0 for r in group) / len(group):.0f}") if has("wrong_to_right") else "-"
            versus = "" if arm == "supervised" else paired(rows, arm, "supervised", "test_teacher_AP")
            versus75 = "" if arm == "supervised" else paired(rows, arm, "supervised", "test_teacher_AP75")
            lines.append(f"| {arm} | {len(group)} | {column('test_teacher_AP')} | {column('test_teacher_AP50')} | "
                         f"{column('test_teacher_AP75')} | {column('test_student_AP')} | {column('val_teacher_AP')} | "
                         f"{versus} | {versus75} | {iou} | {acc} | {relabels} |")
        # Each Polishing Teacher variant against the Soft Teacher variant at the same place in
        # VARIANTS (the paper's weights; weight 1), where both ran.
        ran = {r["arm"] for r in rows}
        pairs = [pair for pair in zip(VARIANTS["polish_teacher"], VARIANTS["soft_teacher"]) if set(pair) <= ran]
        lines += [""] if pairs else []
        lines += [f"{pt} - {st}, test teacher AP (paired): {paired(rows, pt, st, 'test_teacher_AP')}" for pt, st in pairs]
        lines += chosen_on_val(rows)
        if any(r["arm"] == "pt_no_polish" for r in rows):
            lines.append(f"polish_teacher - pt_no_polish, test teacher AP75 (paired): "
                         f"{paired(rows, 'polish_teacher', 'pt_no_polish', 'test_teacher_AP75')}")
    return "\n".join(lines)


def chosen_on_val(rows: list[dict]) -> list[str]:
    """Per method, its variant with the higher mean validation teacher AP (every variant on
    the same seeds), and the chosen ones compared on the test split (paired)."""
    chosen = {}
    for method, arms in VARIANTS.items():
        ran = {arm: {r["seed"]: r["val_teacher_AP"] for r in rows if r["arm"] == arm} for arm in arms}
        if not all(ran.values()) or len({frozenset(values) for values in ran.values()}) != 1:
            return []  # not every variant has run on the same seeds yet
        chosen[method] = max(arms, key=lambda arm: statistics.fmean(ran[arm].values()))
    lines = ["\nTuned on the validation split (each method: its default and one alternative, every seed; "
             "chosen by mean val teacher AP): " + ", ".join(f"{method} -> **{arm}**" for method, arm in chosen.items())]
    for baseline in ("supervised", "soft_teacher"):
        for key, name in (("test_teacher_AP", "teacher AP"), ("test_teacher_AP75", "teacher AP75"),
                          ("test_student_AP", "student AP")):
            lines.append(f"- {chosen['polish_teacher']} - {chosen[baseline]}, test {name} (paired): "
                         f"{paired(rows, chosen['polish_teacher'], chosen[baseline], key)}")
    return lines


# The generated part of method_benchmark.md lies between these two lines. Text a person adds
# outside them (which machine, which invocations, what to read) is kept on every rewrite.
GENERATED_BEGIN = "<!-- generated by experiments/benchmark.py from method_benchmark.json; text outside these markers is kept -->"
GENERATED_END = "<!-- end of the generated part -->"


def write_markdown(args: argparse.Namespace, records: list[dict], path: Path, wall: float | None) -> str:
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
        f"(unsupervised weight ramped over {args.unsup_warmup}). AP in percent; ± is the standard deviation over "
        "seeds; paired differences are per seed (same split, same burn-in). Pseudo-label columns: mean over the "
        "unsupervised log intervals against the unlabeled images' hidden ground truth; relabels summed per run.\n"
        + (f"\nWall time of this invocation: {wall / 60:.0f} min on {os.cpu_count()} CPU cores.\n" if wall else "")
        + table(records) + f"\n{GENERATED_END}"
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
    records = load_records(json_path)
    started = time.perf_counter()
    if not args.table_only:
        plan = Plan(args, plan_runs(args))
        todo = [run for run in plan.runs if run.name not in records]
        print(f"{len(plan.runs)} runs planned, {len(plan.runs) - len(todo)} already recorded in {json_path}", flush=True)
        threads = max((os.cpu_count() or 1) // args.jobs, 1)
        # Burn-ins first (each is shared by its fraction and seed's arms), then the arms.
        keys = sorted({(run.percent, run.seed) for run in todo})
        prepare_data(args, keys)
        with ThreadPoolExecutor(args.jobs) as pool:
            burn_ins = dict(zip(keys, pool.map(lambda key: ensure_burn_in(plan, *key, threads), keys)))
            futures = {pool.submit(run_arm, plan, run, burn_ins[(run.percent, run.seed)], threads): run for run in todo}
            failed = []
            for future, run in futures.items():
                try:
                    records[run.name] = future.result()
                except Exception as error:  # the others go on; the failure is reported at the end
                    failed.append(f"{run.name}: {error}")
                    continue
                save_records(json_path, records)
        if failed:
            print("failed runs (run the command again to retry them):\n  " + "\n  ".join(failed), file=sys.stderr)
    wall = None if args.table_only else time.perf_counter() - started
    print(write_markdown(args, list(records.values()), md_path, wall))
    return 1 if not args.table_only and failed else 0


if __name__ == "__main__":
    sys.exit(main())
