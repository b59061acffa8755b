"""``ssod-tune confirm``: is the study's best configuration better, on data it never saw?

The best completed trial (chosen on validation only), the shipped default and the paper's
configuration (the study's enqueued trials ``default`` and ``paper``) are trained again on other
paired seeds (``tune.confirm_seeds``: each its own labeled split and its own shared burn-in),
with a held-out test split (``tune.confirm_overrides``), evaluated once, at the end. The paired
differences of test teacher AP get a 95% bootstrap interval over seeds and test images
(``ssod.bootstrap``). Resumable run by run: a finished run is read, an interrupted one resumes.

Written: ``<out>/tuning_benchmark.json`` (``runs``: config, seed, test_teacher_AP, ...;
``summary``: comparison, mean, ci_low, ci_high, positive) and ``<out>/tuning_benchmark.md``;
logged on the study's MLflow parent run (``confirm/...`` metrics, the table, its description).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import optuna
from omegaconf import OmegaConf

from ssod.tuning.burn_in import with_shared_burn_in
from ssod.tuning.report import CONFIRMATION_TAG, best_trial, describe_study, find_parent_run, rerun_command
from ssod.tuning.settings import StudySetup
from ssod.tuning.space import override, to_overrides
from ssod.tuning.storage import ENQUEUED_ATTR

log = logging.getLogger(__name__)

CONFIGS = ("best", "default", "paper")
COMPARISONS = (("best", "default"), ("best", "paper"), ("default", "paper"))


def configurations(study: optuna.Study) -> dict[str, dict]:
    """``best`` (the best completed trial), and ``default``/``paper`` (the enqueued trials)."""
    found = {}
    best = best_trial(study)
    if best is None:
        raise LookupError(f"study {study.study_name!r} has no completed trial to confirm")
    found["best"] = {"params": best.params, "trial": best.number, "val": best.value}
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get(ENQUEUED_ATTR)
        if name in CONFIGS and name not in found:
            found[name] = {"params": trial.params, "trial": trial.number,
                           "val": trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None}
    return found


def confirm(setup: StudySetup, study: optuna.Study, out_dir: Path, replicates: int = 2000, trainer=None) -> dict:
    """Train every (configuration, seed) still missing, then write and log the comparison."""
    from ssod.config import compose
    from ssod.data.pipeline import resolve_files

    if trainer is None:
        from ssod.training import run as trainer
    tune = setup.tune
    configs = configurations(study)
    json_path = out_dir / "tuning_benchmark.json"
    runs = {(r["config"], r["seed"]): r for r in _load(json_path).get("runs", [])}
    timings: dict[str, float] = {}
    test_json = None
    for seed in tune.confirm_seeds:
        seeded = dataclasses.replace(setup, fixed_overrides=[
            *setup.fixed_overrides, f"data.fold={seed + 1}", f"train.seed={seed}", *tune.confirm_overrides])
        started = time.perf_counter()
        continued = with_shared_burn_in(seeded)
        timings[f"burn_in_seed_{seed}"] = time.perf_counter() - started
        for name, config in configs.items():
            output_dir = setup.study_dir / "confirm" / f"seed-{seed}" / name
            cfg = compose([*continued.fixed_overrides, *to_overrides(config["params"]), "train.progress=false",
                           override("train.output_dir", str(output_dir)),
                           override("train.run_name", f"{tune.study_name}-confirm-{name}-seed{seed}"),
                           override("tracking.uri", setup.tracking_uri), override("tracking.experiment", setup.experiment),
                           *(["train.resume=auto"] if (output_dir / "checkpoints").is_dir() else [])])
            test_json = str(resolve_files(OmegaConf.to_object(cfg.data), setup.project_dir).test_json)
            metrics = _finished(output_dir, cfg.train.iterations)
            if metrics is None:
                started = time.perf_counter()
                trainer(cfg)
                timings[f"{name}_seed_{seed}"] = time.perf_counter() - started
                metrics = _finished(output_dir, cfg.train.iterations)
                if metrics is None:
                    raise RuntimeError(f"{output_dir}: the confirmation run did not finish")
            runs[(name, seed)] = {
                "config": name, "seed": seed, "trial": config["trial"], "params": config["params"],
                "val_in_study": config["val"], "test_teacher_AP": metrics.get("test/teacher/bbox_AP"),
                "val_teacher_AP": metrics.get("val/teacher/bbox_AP"), "mlflow_run_id": metrics.get("mlflow_run_id"),
                "machine": metrics.get("machine"),
                "detections": str(output_dir / "test_detections" / "teacher.json.gz"), "test_json": test_json,
            }
            _save(json_path, {"runs": list(runs.values())})
    document = {"study": tune.study_name, "metric": "test teacher AP (COCO AP, fraction)",
                "runs": sorted(runs.values(), key=lambda r: (r["seed"], r["config"])),
                "summary": _summary(list(runs.values()), replicates), "timings_s": timings,
                "best_trial": configs["best"]["trial"], "rerun": rerun_command(setup, best_trial(study))}
    _save(json_path, document)
    (out_dir / "tuning_benchmark.md").write_text(markdown(document))
    _log(setup, study, document)
    return document


def _finished(output_dir: Path, iterations: int) -> Optional[dict]:
    path = output_dir / "final_metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("step") == iterations else None


def _summary(runs: list[dict], replicates: int) -> list[dict]:
    from ssod.bootstrap import DetectionFiles, paired_bootstrap

    files = DetectionFiles()

    def matches(run: dict):
        return files.matches(run["detections"], run["test_json"])

    by = {(r["config"], r["seed"]): r for r in runs}
    summary = []
    for method, baseline in COMPARISONS:
        seeds = sorted({s for c, s in by if c == method} & {s for c, s in by if c == baseline})
        if not seeds:
            continue
        interval = paired_bootstrap({s: (matches(by[(method, s)]), matches(by[(baseline, s)])) for s in seeds},
                                    replicates=replicates)
        summary.append({"comparison": f"{method}-{baseline}", "mean": interval.mean, "ci_low": interval.ci_low,
                        "ci_high": interval.ci_high, "seeds": interval.seeds, "positive": interval.positive,
                        "per_seed": {str(s): v for s, v in interval.per_seed.items()}})
    return summary


def markdown(document: dict) -> str:
    """The confirmation as a table (AP in percent)."""
    lines = [f"# Tuning benchmark: study {document['study']}", "",
             "Generated by `ssod-tune confirm` from tuning_benchmark.json.", "",
             "| config | trial | val AP in the study | test teacher AP per seed |", "| --- | --- | --- | --- |"]
    for name in CONFIGS:
        rows = [r for r in document["runs"] if r["config"] == name]
        if rows:
            val = rows[0]["val_in_study"]
            per_seed = ", ".join(f"s{r['seed']}: {100 * r['test_teacher_AP']:.1f}" for r in rows)
            lines.append(f"| {name} | {rows[0]['trial']} | {'-' if val is None else f'{100 * val:.1f}'} | {per_seed} |")
    lines += ["", "Paired differences of test teacher AP, 95% bootstrap interval over seeds and test images:", "",
              "| comparison | seeds | mean | 95% interval | seeds > 0 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s['comparison']} | {s['seeds']} | {100 * s['mean']:+.2f} | [{100 * s['ci_low']:+.2f}, "
              f"{100 * s['ci_high']:+.2f}] | {s['positive']}/{s['seeds']} |" for s in document["summary"]]
    lines += ["", f"Best configuration again: `{document['rerun']}`", ""]
    return "\n".join(lines)


def _log(setup: StudySetup, study: optuna.Study, document: dict) -> None:
    from ssod.tracking import Tracker

    parent = find_parent_run(setup)
    if parent is None:
        return
    tracker = Tracker(setup.tracking_uri, setup.experiment)
    tracker.run_id = parent
    metrics = {}
    for s in document["summary"]:
        for key in ("mean", "ci_low", "ci_high"):
            if s[key] is not None and math.isfinite(s[key]):
                metrics[f"confirm/{s['comparison']}/{key}"] = s[key]
        metrics[f"confirm/{s['comparison']}/positive_seeds"] = s["positive"]
    tracker.log_metrics(metrics, step=0)
    tracker.log_text(markdown(document), "study/tuning_benchmark.md")
    tracker.log_dict(document, "study/tuning_benchmark.json")
    verdicts = [f"{s['comparison']}: {100 * s['mean']:+.1f} AP [{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}], "
                f"{s['positive']}/{s['seeds']} seeds positive" for s in document["summary"]]
    tracker.set_tags({CONFIRMATION_TAG: f"Confirmed on the held-out test split (seeds {setup.tune.confirm_seeds}, "
                                        f"best = trial {document['best_trial']}): " + "; ".join(verdicts) + "."})
    describe_study(tracker, setup, study)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, document: dict) -> None:
    from ssod.io import write_text_atomic

    write_text_atomic(json.dumps(document, indent=1, default=str) + "\n", path)
