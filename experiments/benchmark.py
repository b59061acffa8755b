"""Synthetic benchmark: supervised vs Soft Teacher vs Polishing Teacher at 5% and 10% labeled.

Every run has the same budget (iterations, labeled batch, seed) and lands in the MLflow
experiment ``ssod-benchmark`` of the project's store; the table of final metrics is
written as markdown with the command that produced it::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmark.py --burn-in 600 --iterations 600 \\
        --out experiments/results/synthetic_benchmark.md -- data.num_workers=1

With ``--burn-in B``, each labeled fraction first gets one supervised run of B iterations
(which also trains the polishing networks on the labeled images, without touching the
detector), and every method then starts from that checkpoint (``train.init_from``): a
from-scratch teacher on a CPU budget is too weak for any pseudo label to pass 0.5, so
the comparison would otherwise measure nothing but the supervised part.

Extra Hydra overrides after ``--`` apply to every run.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("supervised", "soft_teacher", "polish_teacher")
COLUMNS = (
    ("teacher AP", "val/teacher/bbox_AP"),
    ("teacher AP50", "val/teacher/bbox_AP50"),
    ("student AP", "val/student/bbox_AP"),
    ("pseudo P (raw)", "pseudo/raw/precision"),
    ("pseudo R (raw)", "pseudo/raw/recall"),
    ("pseudo P (cls)", "pseudo/cls/precision"),
    ("pseudo R (cls)", "pseudo/cls/recall"),
    ("IoU raw", "pseudo/raw/iou_mean"),
    ("IoU polished", "pseudo/polished/iou_mean"),
    ("s/iter", "train/sec_per_iter"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--burn-in", type=int, default=0, help="shared supervised iterations before each method")
    parser.add_argument("--percents", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="ssod-benchmark", help="MLflow experiment name")
    parser.add_argument("--out", default="experiments/results/synthetic_benchmark.md")
    parser.add_argument("--table-only", action="store_true", help="write the table from runs already in MLflow")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return parser.parse_args(argv)


def run_one(method: str, percent: float, args: argparse.Namespace, iterations: int, extra=(), tag: str = "") -> str:
    """Train one configuration in a fresh process; returns its run name."""
    name = f"bench-{tag or method}-{percent:g}pct-s{args.seed}"
    overrides = [
        "experiment=synthetic",
        f"method={method}",
        f"data.percent={percent}",
        f"train.iterations={iterations}",
        f"train.eval_every={max(iterations // 3, 1)}",
        f"train.ckpt_every={iterations}",
        f"train.lr_steps=[{int(iterations * 0.8)}]",
        f"train.seed={args.seed}",
        # Its burn-in is a run of its own (--burn-in): no second one inside each method's run.
        "method.unsup_start=0",
        "method.unsup_warmup=0",
        f"train.run_name={name}",
        f"train.output_dir=outputs/benchmark/{name}",
        "train.progress=false",
        f"tracking.experiment={args.experiment}",
        *extra,
        *args.overrides,
    ]
    command = [sys.executable, "-m", "ssod.train", *overrides]
    # A fresh run refuses a folder with checkpoints; a benchmark run replaces its own.
    previous = Path("outputs/benchmark") / name / "checkpoints"
    if previous.is_dir():
        print(f"  replacing the checkpoints of an earlier {name} in {previous}", flush=True)
        shutil.rmtree(previous)
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return name


def final_metrics(experiment: str) -> dict[str, dict[str, float]]:
    """Latest value of every metric of every FINISHED run of ``experiment``, by run name."""
    from mlflow.tracking import MlflowClient

    from ssod.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(Path.cwd()))
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    return {run.info.run_name: dict(run.data.metrics) for run in runs}


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if abs(value) <= 1.0 else f"{value:.2f}"


def table(names: dict[tuple[str, float], str], metrics: dict[str, dict[str, float]], args) -> str:
    header = "| labeled | method | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    for (method, percent), name in names.items():
        values = metrics.get(name, {})
        cells = [fmt(values.get(key)) if key != "train/sec_per_iter" else f"{values.get(key, math.nan):.2f}" for _, key in COLUMNS]
        lines.append(f"| {percent:g}% | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = {}
    for percent in args.percents if not args.table_only else []:
        extra = []
        if args.burn_in:
            burn_in = run_one("supervised", percent, args, args.burn_in, ["method.polish=true"], tag="burnin")
            extra = [f"train.init_from=outputs/benchmark/{burn_in}/checkpoints", "train.warmup_iters=0"]
        for method in args.methods:
            names[(method, percent)] = run_one(method, percent, args, args.iterations, extra)
    if args.table_only:
        names = {(m, p): f"bench-{m}-{p:g}pct-s{args.seed}" for p in args.percents for m in args.methods}
    metrics = final_metrics(args.experiment)
    command = "python experiments/benchmark.py " + shlex.join(sys.argv[1:])
    text = (
        "# Synthetic benchmark\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {os.cpu_count()} CPU cores, no GPU. Same seed ({args.seed}), iterations "
        f"({args.iterations}) and labeled batch for every method. AP, precision, recall and "
        "IoU are percentages; pseudo-label columns are the last log interval's values "
        "against the unlabeled images' hidden ground truth.\n\n" + table(names, metrics, args) + "\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
