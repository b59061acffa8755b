"""Golden run: proof that a refactoring left training unchanged.

Trains every method (and the oracle and an ablation) for a few iterations on a tiny
synthetic set, on the CPU, deterministically, and records per iteration every logged loss
and at the end a checksum of the student's and the teacher's parameters::

    .venv/bin/python experiments/golden_run.py --write experiments/results/golden_run.json
    .venv/bin/python experiments/golden_run.py --check experiments/results/golden_run.json

``--check`` exits 1 and names every difference (bit-exact: losses as float reprs, weights
by SHA-256). Recorded on one machine; another CPU or torch build may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# Each arm names its unsupervised weight (the methods' own: 3 and 4), and no recipe choice
# (conf/experiment_method/, removed with ~experiment_method) changes what the recorded losses mean.
ARMS = {
    "supervised": ["method=supervised"],
    "soft_teacher": ["method=soft_teacher", "method.unsup_weight=4.0"],
    "polish_teacher": ["method=polish_teacher", "method.unsup_weight=3.0"],
    "pt_cls_only": ["method=polish_teacher", "method.unsup_weight=3.0", "method.polish_use=categories"],
    "oracle": ["method=polish_teacher", "method.unsup_weight=3.0", "method.pseudo_labels=oracle"],
}
TINY = [
    "experiment=synthetic", "~experiment_method", "data.synthetic.num_train=24", "data.synthetic.num_val=4", "data.percent=25",
    "data.num_workers=0", "data.train_min_sizes=[96,128]", "data.train_max_size=160", "data.test_size=96",
    "data.test_max_size=160", "model.fpn_channels=32", "model.box_head_dim=64", "method.polish_hidden=64",
    "method.reg_samples=8", "method.cls_samples=[4,4]", "method.reg_jitter_times=4",
    "method.pseudo_label_initial_score_thr=0.0", "method.unsup_start=2", "method.unsup_warmup=2",
    "train.iterations=5", "train.log_every=1", "train.eval_every=5", "train.ckpt_every=5", "train.warmup_iters=2",
    "train.progress=false", "train.num_vis_images=0", "train.cpu=true",
]


def checksum(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def record(work: Path) -> dict:
    import torch
    from mlflow.tracking import MlflowClient

    from ssod.checkpoint import list_checkpoints, load_checkpoint
    from ssod.config import compose
    from ssod.train import run

    torch.use_deterministic_algorithms(True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    result = {}
    for arm, overrides in ARMS.items():
        output = work / arm
        run(compose([*TINY, *overrides, f"data.cache_dir={work / 'cache'}", f"train.output_dir={output}",
                     f"tracking.uri={uri}", f"tracking.experiment={arm}"]))
        client = MlflowClient(uri)
        found = client.search_runs([client.get_experiment_by_name(arm).experiment_id])[0]
        losses: dict[str, dict[str, str]] = {}
        for key in sorted(found.data.metrics):
            if key.startswith("train/") and ("loss" in key or "/sup/" in key or "/unsup/" in key or "/polish/" in key):
                for metric in client.get_metric_history(found.info.run_id, key):
                    losses.setdefault(str(metric.step), {})[key] = repr(metric.value)
        final = load_checkpoint(list_checkpoints(output / "checkpoints")[-1][1])
        result[arm] = {"losses": losses, "student": checksum(final["student"]), "teacher": checksum(final["teacher"])}
    return result


def differences(expected: dict, found: dict) -> list[str]:
    problems = []
    for arm in expected:
        if arm not in found:
            problems.append(f"{arm}: missing")
            continue
        for part in ("student", "teacher"):
            if expected[arm][part] != found[arm][part]:
                problems.append(f"{arm}: final {part} weights differ")
        for step, values in expected[arm]["losses"].items():
            for key, value in values.items():
                now = found[arm]["losses"].get(step, {}).get(key)
                if now != value:
                    problems.append(f"{arm} step {step} {key}: {value} -> {now}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the golden run into this json")
    mode.add_argument("--check", type=Path, help="compare with this recorded json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as work:
        found = record(Path(work))
    if args.write:
        args.write.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"golden run of {len(found)} arms written to {args.write}")
        return 0
    problems = differences(json.loads(args.check.read_text()), found)
    for problem in problems:
        print(problem)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
