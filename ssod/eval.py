"""Evaluate a checkpoint on any COCO json (``ssod-eval``).

Examples::

    ssod-eval outputs/polish_teacher-synthetic/latest      # a run folder: its newest checkpoint
    ssod-eval outputs/polish_teacher-synthetic/latest/checkpoints/step-00000700.pt
    ssod-eval CKPT --json val.json --images val2017/ --model teacher --score-thr 0.05
    ssod-eval CKPT --overrides experiment=coco_partial --out metrics.json
    ssod-eval CKPT --log --uri http://localhost:5000             # log the report into MLflow

It prints the per-class AP table in % and writes into ``--save-dir`` (default
``<run folder>/eval/<json name>-<model>-step-<step>/``): ``metrics.json`` (what ``--out``
gets), ``detections.json`` (COCO results: ``image_id``, ``category_id``, ``bbox`` xywh in
original pixels, ``score``), ``per_class_ap.txt``, ``pr_curves.png`` and
``confusion_matrix.png``. When the checkpoint's MLflow run is in its tracking store (or
``--uri``), the same files are logged into it under ``evaluation/<that folder's name>/``;
``--log`` without such a run logs them into a new run of its own, ``--no-log`` logs nothing.

A checkpoint carries the resolved config of its run and its categories, so it needs no
other argument: the model is rebuilt as it was trained, and only its detector is loaded
(the polishing networks are not needed to detect). ``--overrides`` composes another
config instead (a checkpoint from before configs were stored needs the run's). Without
``--json`` the config's validation set is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from omegaconf import OmegaConf

from ssod.build import apply_speed_settings, build_model
from ssod.checkpoint import checkpoint_file, load_checkpoint
from ssod.cli import one_line_errors
from ssod.config import eval_workers
from ssod.data.coco import CategoryMap, load_coco, load_split
from ssod.data.pipeline import EvalView, resolve_files
from ssod.data.transforms import EvalTransform
from ssod.evaluation import read_detections
from ssod.inference import checkpoint_config, eval_loader, evaluate, load_detector, shard
from ssod.masking import mask_secrets
from ssod.mlflow_client import bound_requests, check_reachable, default_tracking_uri
from ssod.report import CONFUSION_SCORE, build_report, log_report, write_report
from ssod.step import forget_accelerator
from ssod.tracking import Tracker, strict_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssod-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run's output or checkpoint directory "
                        "(its best.pt, else its newest complete checkpoint)")
    parser.add_argument("--json", help="COCO json to evaluate on (default: the config's validation json)")
    parser.add_argument("--images", help="image directory of --json")
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--score-thr", type=float, default=None, help="detection score threshold (default: config)")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides the run was trained with")
    parser.add_argument("--out", help="write the metrics as JSON here too")
    parser.add_argument("--save-dir", help="where the detections, table and plots go "
                        "(default: <run folder>/eval/<json name>-<model>-step-<step>)")
    parser.add_argument("--log", action=argparse.BooleanOptionalAction, default=None,
                        help="log the report to MLflow (default: when the checkpoint's run is in the store)")
    parser.add_argument("--uri", help="MLflow tracking URI (default: the run's tracking.uri, else "
                        "$MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--confusion-score", type=float, default=CONFUSION_SCORE,
                        help="the score a detection needs to count in the confusion matrix")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ssod-eval``): a user's error is one line and exit status 2."""
    return one_line_errors("ssod-eval", _evaluate_checkpoint, argv)


def _evaluate_checkpoint(argv: list[str] | None) -> int:
    args = parse_args(argv)
    path = checkpoint_file(args.checkpoint, "checkpoint", prefer_best=True)
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, args.overrides)
    if args.score_thr is not None:
        cfg.model.box_score_thresh = args.score_thr
    # The label space is the training set's: predictions map back through its categories.
    if "categories" in state:
        category_map = CategoryMap(tuple(state["categories"]["ids"]), tuple(state["categories"]["names"]))
    else:
        category_map = CategoryMap.from_coco(load_coco(resolve_files(cfg.data, Path.cwd()).train_json))
    model = apply_speed_settings(cfg.train, build_model(cfg.model, OmegaConf.to_object(cfg.method), category_map.num_classes))
    load_detector(model.detector, state[args.model], f"{path} ({args.model})")  # before any data is read
    files = resolve_files(cfg.data, Path.cwd())
    json_path = Path(args.json) if args.json else files.val_json
    images = Path(args.images) if args.images else (files.val_images if not args.json else json_path.parent)
    view = EvalView(EvalTransform(cfg.data.test_size, cfg.data.test_max_size))
    dataset = load_split(json_path, images, category_map, view)
    accelerator = Accelerator(cpu=args.cpu)
    with tempfile.TemporaryDirectory() as work:
        try:
            detector = model.detector.to(accelerator.device)
            loader = eval_loader(dataset, shard(dataset, accelerator), num_workers=eval_workers(cfg.data, accelerator.device),
                                 pin_memory=accelerator.device.type == "cuda")
            metrics = evaluate(detector, loader, accelerator, save_to=Path(work) / "detections.json.gz")
        finally:
            forget_accelerator(accelerator)
        if metrics is None:
            return 0
        image_ids, results = read_detections(Path(work) / "detections.json.gz")
    # NaN (a metric without ground truth) is null: strict JSON readers reject a bare NaN.
    metrics = {f"{args.model}/bbox_{key}": value for key, value in metrics.items()}
    record = {"checkpoint": str(path), "json": str(json_path), "step": state["step"], **metrics}
    folder = Path(args.save_dir) if args.save_dir else _default_folder(path, json_path, args.model, state["step"])
    report = build_report(dataset.coco, results, image_ids, args.confusion_score)
    write_report(report, folder)
    text = strict_json(record)
    (folder / "metrics.json").write_text(text + "\n")
    (folder / "detections.json").write_text(json.dumps(results))
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(report.table())
    print(f"ssod-eval: {args.model} AP {_percent(record, args.model, 'AP')}, AP50 {_percent(record, args.model, 'AP50')} "
          f"on {len(image_ids)} images of {json_path} (COCO AP in %); detections, table, PR curves and "
          f"confusion matrix in {folder}")
    logged = _log_to_mlflow(args, cfg, state, record, report, folder)
    if logged:
        print(f"ssod-eval: logged to MLflow {logged}")
    return 0


def _percent(record: dict, model: str, key: str) -> str:
    value = record.get(f"{model}/bbox_{key}")
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _default_folder(checkpoint: Path, json_path: Path, model: str, step: int) -> Path:
    """``<run folder>/eval/<json name>-<model>-step-<step>`` (the run folder holds ``checkpoints/``)."""
    run_folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_folder / "eval" / f"{json_path.name.removesuffix('.json')}-{model}-step-{step:08d}"


def _log_to_mlflow(args: argparse.Namespace, cfg, state: dict, record: dict, report, folder: Path) -> Optional[str]:
    """Log the report into the checkpoint's run (when its store has it) or, with ``--log``, a
    new run; returns where (None: not logged). ``--log`` makes a tracking failure an error;
    without it, the checkpoint's run is only looked for, and not finding it is a note."""
    run_id = state.get("mlflow_run_id") or ""
    if args.log is False or (args.log is None and not run_id):
        return None
    uri = args.uri or cfg.tracking.uri or default_tracking_uri(Path.cwd())
    if args.log is None and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"ssod-eval: not logged to MLflow: no store at {uri} (give --uri)")
        return None
    check_reachable(uri)
    bound_requests()
    tracker = Tracker(uri, cfg.tracking.experiment)
    if run_id and _run_exists(tracker, run_id):
        tracker.run_id = run_id  # artifacts into the training run, which stays as it was (no reopening)
        new_run = False
    elif args.log:
        tracker.start(f"eval {folder.name}", tags={"ssod.evaluated_checkpoint": record["checkpoint"],
                                                  "ssod.evaluated_json": record["json"]})
        tracker.log_metrics({key: value for key, value in record.items() if "/bbox_" in key}, record["step"])
        new_run = True
    else:
        print(f"ssod-eval: not logged to MLflow: run {run_id} is not in {mask_secrets(uri)} (give --uri, or --log "
              "for a run of its own)")
        return None
    artifact_dir = f"evaluation/{folder.name}"
    log_report(tracker, report, artifact_dir)
    for name in ("metrics.json", "detections.json"):
        tracker.log_artifact(folder / name, artifact_dir)
    if new_run:
        tracker.end("FINISHED")
    tracker.experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    return f"run {tracker.run_id} ({mask_secrets(uri)}), artifacts {artifact_dir}/; see it: {tracker.links()}"


def _run_exists(tracker: Tracker, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.get_run(run_id)
        return True
    except MlflowException:
        return False


if __name__ == "__main__":
    sys.exit(main())
