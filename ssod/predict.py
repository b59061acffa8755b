"""Run a checkpoint on images and write COCO-format detections (``ssod-predict``).

Examples::

    ssod-predict outputs/polish_teacher-synthetic/latest --images photos/ --out detections.json --draw pictures/
    ssod-predict CKPT --json val.json --images val2017/ --out detections.json

Input: a folder of images (``--images``; jpg, jpeg, png, bmp, webp, tif, searched
recursively) or a COCO json with its image folder (``--json`` and ``--images``). Output: the
COCO results json every COCO tool reads (a list of ``image_id``, ``category_id``, ``bbox``
as ``[x, y, width, height]`` in original-image pixels, ``score``), with the checkpoint's own
category ids. For a folder, the images it numbered are written beside it as a COCO json
(``<out>`` with ``.images.json``), so ``COCO(images_json).loadRes(out)`` pairs them up;
with ``--draw DIR``, a picture of each image with its boxes scoring at least ``--draw-score``,
a colour per class, each labelled with class name and score just outside the box (a warning
says how many pictures show no box, and the highest score left out). Like ``ssod-eval``, the checkpoint needs no other argument: it
carries its config and categories.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from accelerate import Accelerator
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from ssod.build import apply_speed_settings, build_model
from ssod.cli import one_line_errors
from ssod.data.coco import CategoryMap, DatasetError, load_split
from ssod.data.pipeline import EvalView
from ssod.data.transforms import EvalTransform
from ssod.inference import checkpoint_with_categories, eval_loader, load_detector, predict
from ssod.step import forget_accelerator
from ssod.visualize import detection_picture

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssod-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run's checkpoint or output directory "
                        "(its best.pt, else its newest step-*.pt)")
    parser.add_argument("--images", required=True, help="a folder of images (or the image folder of --json)")
    parser.add_argument("--json", help="a COCO json naming the images to run on (its ids are kept)")
    parser.add_argument("--out", required=True, help="the COCO results json to write")
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--score-thr", type=float, default=None,
                        help="keep detections above this score (default: the model's, 0.05: what COCO AP needs)")
    parser.add_argument("--draw", metavar="DIR", help="also write a picture of each image with its detections here")
    parser.add_argument("--draw-score", type=float, default=0.5, help="the score a box needs to be drawn")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ssod-predict``): a user's error is one line and exit status 2."""
    return one_line_errors("ssod-predict", _predict_checkpoint, argv)


def _predict_checkpoint(argv: list[str] | None) -> int:
    args = parse_args(argv)
    path, state, cfg, categories = checkpoint_with_categories(
        args.checkpoint, args.score_thr, hint="; use ssod-eval with --overrides instead")
    model = apply_speed_settings(cfg.train, build_model(cfg.model, OmegaConf.to_object(cfg.method), categories.num_classes))
    load_detector(model.detector, state[args.model], f"{path} ({args.model})")
    images = Path(args.images)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as work:
        json_path = Path(args.json) if args.json else _folder_json(images, categories, Path(work) / "images.json")
        view = EvalView(EvalTransform(cfg.data.test_size, cfg.data.test_max_size))
        dataset = load_split(json_path, images, categories, view)
        accelerator = Accelerator(cpu=args.cpu)
        try:
            loader = eval_loader(dataset, list(range(len(dataset))), batch_size=args.batch_size)
            detections = predict(model.detector.to(accelerator.device), loader, accelerator.device, progress="predict")
        finally:
            forget_accelerator(accelerator)
        results = coco_results(detections, categories)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results))
        if not args.json:
            images_json = out.with_suffix(".images.json")
            images_json.write_text(json_path.read_text())
            print(f"ssod-predict: the images' ids are in {images_json}")
        if args.draw:
            empty, best_left_out = draw_detections(dataset, detections, categories, Path(args.draw), args.draw_score)
    unreadable = sum(1 for d in detections if d.get("unreadable"))  # predict gives each image once
    if not results:
        print(f"ssod-predict: warning: no detection scored >= {cfg.model.box_score_thresh:g} (--score-thr) "
              "on any image", file=sys.stderr)
    elif args.draw and empty:
        highest = f"the highest score left out is {best_left_out:.2f}" if best_left_out > float("-inf") else \
            "no box was left out"
        print(f"ssod-predict: warning: {empty} of {len(dataset) - unreadable} pictures show no box: none scored >= "
              f"{args.draw_score:g} (--draw-score); {highest}", file=sys.stderr)
    print(f"ssod-predict: {len(results)} detections on {len(dataset) - unreadable} images written to {out}"
          + (f"; {unreadable} unreadable images skipped" if unreadable else "")
          + (f"; pictures in {args.draw}" if args.draw else ""))
    return 0


def _folder_json(folder: Path, categories: CategoryMap, path: Path) -> Path:
    """A COCO json of every image under ``folder`` (ids 1.., names relative to it), no annotations."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (--images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    images = []
    for image_id, file in enumerate(files, start=1):
        try:
            with Image.open(file) as picture:
                width, height = picture.size
        except (UnidentifiedImageError, OSError):
            width = height = 1  # read again by the loader, which skips and reports it
        images.append({"id": image_id, "file_name": str(file.relative_to(folder)), "width": width, "height": height})
    cats = [{"id": int(i), "name": name} for i, name in zip(categories.category_ids, categories.names)]
    path.write_text(json.dumps({"info": {"description": f"ssod-predict: the images of {folder}"},
                                "images": images, "annotations": [], "categories": cats}))
    return path


def coco_results(detections: list[dict], categories: CategoryMap) -> list[dict]:
    """``predict``'s detections as COCO results (``bbox`` xywh, the dataset's category ids)."""
    results = []
    for detection in detections:
        if detection.get("unreadable"):
            continue
        for box, score, label in zip(detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist()):
            x0, y0, x1, y1 = box
            results.append({
                "image_id": int(detection["image_id"]),
                "category_id": int(categories.label_to_category_id[int(label)]),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(score), 4),
            })
    return results


def draw_detections(dataset, detections: list[dict], categories: CategoryMap, folder: Path,
                    min_score: float) -> tuple[int, float]:
    """One JPEG per image: its boxes scoring >= ``min_score``, a colour per class, each
    labelled with class name and score. Returns how many images had no such box, and the
    highest score of a box left out (-inf when none was)."""
    from ssod.plots import class_colours

    colours = [tuple(round(255 * c) for c in colour) for colour in class_colours(len(categories.names))]
    folder.mkdir(parents=True, exist_ok=True)
    empty, best_left_out = 0, float("-inf")
    for detection in detections:
        if detection.get("unreadable"):
            continue
        info = dataset.coco.imgs[int(detection["image_id"])]
        keep = detection["scores"] >= min_score
        if not bool(keep.any()):
            empty += 1
        if bool((~keep).any()):
            best_left_out = max(best_left_out, float(detection["scores"][~keep].max()))
        with Image.open(Path(dataset.image_dir) / info["file_name"]) as image:
            picture = detection_picture(image, detection["boxes"][keep], detection["labels"][keep],
                                        detection["scores"][keep], categories.names, colours)
        name = Path(info["file_name"]).with_suffix(".jpg").as_posix().replace("/", "__")
        picture.save(folder / name, quality=90)
    return empty, best_left_out


if __name__ == "__main__":
    sys.exit(main())
