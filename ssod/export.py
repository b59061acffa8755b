"""Export a checkpoint's detector as TorchScript and ONNX, checked on an image (``ssod-export``).

Examples::

    ssod-export outputs/polish_teacher-synthetic/latest --image photo.jpg --out exported/
    ssod-export CKPT --image photo.jpg --out exported/ --format torchscript --score-thr 0.3

Writes into ``--out``: ``detector.torchscript.pt`` (``torch.jit.load``), ``detector.onnx``
(opset 17, any image size) and ``detector.json`` (categories, input size, the check's
numbers). Both files take one image ``[3, H, W]`` float32 RGB in [0, 1] and return
``boxes [K, 4]`` (xyxy, the image's pixels), ``scores [K]``, ``labels [K]`` (int64, label
``i`` is ``categories.names[i - 1]``); they do not resize: give images resized as the
model was evaluated (short side ``input.short_side``, long side at most ``input.max_size``).

The check: the exported file runs on ``--image`` (resized so) and its boxes are compared
with the checkpoint's PyTorch detector on the same tensor; a box further than
``--tolerance`` pixels, or a box without a counterpart, fails the export (exit status 1).
The ONNX check runs the file in onnxruntime (``pip install onnxruntime``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from ssod.build import build_model
from ssod.cli import MissingDependency, one_line_errors
from ssod.data.coco import DatasetError
from ssod.data.transforms import EvalTransform
from ssod.evaluation import match_greedy
from ssod.inference import checkpoint_with_categories, load_detector
from ssod.models.deployable import DeployableDetector

FORMATS = ("torchscript", "onnx")
OPSET = 17


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssod-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run's checkpoint or output directory "
                        "(its best.pt, else its newest step-*.pt)")
    parser.add_argument("--image", required=True, help="an image to check the exported files on")
    parser.add_argument("--out", required=True, help="the folder to write the exported files to")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--score-thr", type=float, default=None, help="keep detections above this score "
                        "(default: the model's)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the largest box difference the check "
                        "accepts, in pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ssod-export``): a user's error is one line and exit status 2."""
    return one_line_errors("ssod-export", _export_checkpoint, argv)


def _export_checkpoint(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if "onnx" in args.format:
        _require("onnx", "onnxruntime")  # before the work, not after it
    path, state, cfg, categories = checkpoint_with_categories(args.checkpoint, args.score_thr)
    names = list(categories.names)
    model = build_model(cfg.model, OmegaConf.to_object(cfg.method), len(names))
    load_detector(model.detector, state[args.model], f"{path} ({args.model})")
    reference = model.detector.cpu().eval()
    image = check_image(Path(args.image), cfg.data.test_size, cfg.data.test_max_size)
    deployable = DeployableDetector(reference).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = reference([image])[0]
    checks = {}
    for name in args.format:
        file = out / ("detector.torchscript.pt" if name == "torchscript" else "detector.onnx")
        run = export_torchscript(deployable, file) if name == "torchscript" else export_onnx(deployable, image, file)
        checks[name] = {"file": file.name, "bytes": file.stat().st_size,
                        **compare_boxes(expected, run(image), args.tolerance)}
    record = {
        "checkpoint": str(path), "step": state["step"], "weights": args.model,
        "categories": {"ids": list(state["categories"]["ids"]), "names": names},
        "input": {"layout": "[3, H, W] float32 RGB in [0, 1], one image", "short_side": cfg.data.test_size,
                  "max_size": cfg.data.test_max_size},
        "outputs": ["boxes [K, 4] xyxy pixels", "scores [K]", "labels [K] int64, 1..C"],
        "score_threshold": cfg.model.box_score_thresh,
        "check": {"image": str(args.image), "size": list(image.shape[-2:]), "tolerance_px": args.tolerance, **checks},
    }
    (out / "detector.json").write_text(json.dumps(record, indent=2) + "\n")
    failed = [name for name, check in checks.items() if not check["passed"]]
    for name, check in checks.items():
        print(f"ssod-export: {name}: {out / check['file']} ({check['bytes'] / 1e6:.1f} MB); on {args.image}: "
              f"{check['boxes']} boxes, largest box difference {check['max_box_diff_px']:.2g} px, "
              f"{check['unmatched']} without a counterpart: {'passed' if check['passed'] else 'FAILED'}")
    if failed:
        print(f"ssod-export: error: the exported {', '.join(failed)} detector does not give the PyTorch "
              f"detector's boxes (see {out / 'detector.json'})", file=sys.stderr)
        return 1
    return 0


def check_image(path: Path, short_side: int, max_size: int) -> torch.Tensor:
    """``path`` as the evaluation pipeline feeds it: [3, H, W] float32 in [0, 1], resized."""
    try:
        with Image.open(path) as picture:
            image, _, _ = EvalTransform(short_side, max_size)(picture.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such image (--image)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: not a readable image (--image): {error}") from None
    return image


def export_torchscript(deployable: DeployableDetector, file: Path):
    """Script ``deployable`` into ``file``; returns a runner of the file as loaded back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still the one C++ format
        torch.jit.save(torch.jit.script(deployable), str(file))
        loaded = torch.jit.load(str(file))

    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            boxes, scores, labels = loaded(image)
        return {"boxes": boxes, "scores": scores, "labels": labels}

    return run


def export_onnx(deployable: DeployableDetector, image: torch.Tensor, file: Path):
    """Trace ``deployable`` on ``image`` into ``file`` (any H and W); returns an onnxruntime runner.

    torch.onnx's default (``dynamo=True``, through ``torch.export``) stops at torchvision's
    ``batched_nms``, which branches on the number of boxes (a data-dependent shape); the
    TorchScript-based exporter handles torchvision's detection models.
    """
    import onnxruntime

    detections = {0: "detections"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it keeps as constants
        torch.onnx.export(deployable, (image,), str(file), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["boxes", "scores", "labels"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": detections,
                                        "scores": detections, "labels": detections})
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, scores, labels = session.run(None, {"image": image.numpy()})
        return {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                "labels": torch.from_numpy(labels)}

    return run


def compare_boxes(expected: dict, exported: dict, tolerance: float) -> dict:
    """Pair each expected box with an exported box of its label (greedy by score, IoU >= 0.5).

    Returns ``boxes`` (expected count), ``exported_boxes``, ``unmatched`` (boxes of either
    without a counterpart), ``max_box_diff_px`` and ``max_score_diff`` over the pairs, and
    ``passed`` (no unmatched box, every coordinate within ``tolerance`` pixels).
    """
    matches = match_greedy(exported["boxes"].float(), expected["boxes"].float(), pred_labels=exported["labels"],
                           gt_labels=expected["labels"], pred_scores=exported["scores"])
    paired = matches >= 0
    box_diff = (exported["boxes"][paired] - expected["boxes"][matches[paired]]).abs()
    score_diff = (exported["scores"][paired] - expected["scores"][matches[paired]]).abs()
    unmatched = len(expected["boxes"]) + len(exported["boxes"]) - 2 * int(paired.sum())
    largest = float(box_diff.max()) if box_diff.numel() else 0.0
    return {"boxes": len(expected["boxes"]), "exported_boxes": len(exported["boxes"]), "unmatched": unmatched,
            "max_box_diff_px": largest, "max_score_diff": float(score_diff.max()) if score_diff.numel() else 0.0,
            "passed": unmatched == 0 and largest <= tolerance}


def _require(*packages: str) -> None:
    import importlib.util

    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependency(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                                "(or --format torchscript)")


if __name__ == "__main__":
    sys.exit(main())
