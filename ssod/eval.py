"""Evaluate a checkpoint on any COCO json (``ssod-eval``).

Examples::

    ssod-eval outputs/polish_teacher-synthetic/latest      # a run folder: its newest checkpoint
    ssod-eval outputs/polish_teacher-synthetic/latest/checkpoints/step-00000700.pt
    ssod-eval CKPT --json val.json --images val2017/ --model teacher --score-thr 0.05
    ssod-eval CKPT --overrides experiment=coco_partial --out metrics.json

A checkpoint carries the resolved config of its run and its categories, so it needs no
other argument: the model is rebuilt as it was trained, and only its detector is loaded
(the polishing networks are not needed to detect). ``--overrides`` composes another
config instead (a checkpoint from before configs were stored needs the run's). Without
``--json`` the config's validation set is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate import Accelerator
from omegaconf import OmegaConf

from ssod.build import apply_speed_settings, build_model
from ssod.checkpoint import checkpoint_file, load_checkpoint
from ssod.cli import one_line_errors
from ssod.config import eval_workers
from ssod.data.pipeline import EvalView, resolve_files
from ssod.data.coco import CategoryMap, load_coco, load_split
from ssod.data.transforms import EvalTransform
from ssod.inference import checkpoint_config, eval_loader, evaluate, load_detector, shard
from ssod.tracking import strict_json
from ssod.step import forget_accelerator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssod-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step-*.pt file, or a run's output or checkpoint directory "
                        "(its newest complete checkpoint)")
    parser.add_argument("--json", help="COCO json to evaluate on (default: the config's validation json)")
    parser.add_argument("--images", help="image directory of --json")
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--score-thr", type=float, default=None, help="detection score threshold (default: config)")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides the run was trained with")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ssod-eval``): a user's error is one line and exit status 2."""
    return one_line_errors("ssod-eval", _evaluate_checkpoint, argv)


def _evaluate_checkpoint(argv: list[str] | None) -> int:
    args = parse_args(argv)
    path = checkpoint_file(args.checkpoint, "checkpoint")
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
    try:
        detector = model.detector.to(accelerator.device)
        loader = eval_loader(dataset, shard(dataset, accelerator), num_workers=eval_workers(cfg.data, accelerator.device),
                             pin_memory=accelerator.device.type == "cuda")
        metrics = evaluate(detector, loader, accelerator)
    finally:
        forget_accelerator(accelerator)
    if metrics is None:
        return 0
    # NaN (a metric without ground truth) is null: strict JSON readers reject a bare NaN.
    metrics = {f"{args.model}/bbox_{key}": value for key, value in metrics.items()}
    record = {"checkpoint": str(path), "json": str(json_path), "step": state["step"], **metrics}
    text = strict_json(record)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
