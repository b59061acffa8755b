"""``ssod-data``: make semi-supervised splits, convert VOC to COCO, check a dataset.

Run as ``ssod-data <command> ...`` (installed console script) or
``python -m ssod.data.cli <command> ...``::

    # folds 1..5 at 1%, 5%, 10% -> data/coco/annotations/semi_supervised/seed-0/
    ssod-data split data/coco/annotations/instances_train2017.json \\
        --percent 1 5 10 --fold 1 2 3 4 5
    # SoftTeacher's exact selection, offset 0 (seeded with fold + offset)
    ssod-data split instances_train2017.json --percent 10 --fold 1 --reference-offset 0
    # VOC07 trainval + VOC12 trainval into one COCO json (images relative to VOCdevkit)
    ssod-data voc2coco data/VOCdevkit --sets 2007:trainval 2012:trainval \\
        --out data/voc/voc0712_trainval.json
    # validate json + images; exit status 1 on errors, 0 when only warnings
    ssod-data check data/coco128/annotations/instances_train2017.json data/coco128/train2017

``split`` writes ``<stem>.{fold}@{percent}.json`` and ``<stem>.{fold}@{percent}-unlabeled.json``
into ``--out-dir`` (default: ``semi_supervised/seed-<seed>/`` or
``semi_supervised/reference-<offset>/`` beside the input json); see
``ssod.data.splits`` for the seed schemes. Exit status: 0 success, 1 failure (bad input
or a failed check), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssod.data.check import check_dataset, format_report
from ssod.data.splits import make_split, scheme_name
from ssod.data.voc import voc_to_coco
from ssod.masking import mask_console


def _year_split(text: str) -> tuple[str, str]:
    year, separator, split = text.partition(":")
    if not separator or not year or not split:
        raise argparse.ArgumentTypeError(f"expected YEAR:SPLIT such as 2007:trainval, got {text!r}")
    return year, split


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssod-data", description="Dataset tools for ssod.")
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="write labeled / unlabeled fold@percent files")
    split.add_argument("coco_json", type=Path)
    split.add_argument("--percent", type=float, nargs="+", required=True)
    split.add_argument("--fold", type=int, nargs="+", required=True)
    split.add_argument("--seed", type=int, default=0, help="default scheme only (default 0)")
    split.add_argument(
        "--reference-offset",
        type=int,
        default=None,
        help="use SoftTeacher's scheme, np.random.seed(fold + OFFSET); ignores --seed",
    )
    split.add_argument("--out-dir", type=Path, default=None)

    voc = commands.add_parser("voc2coco", help="convert VOC xml annotations to one COCO json")
    voc.add_argument("voc_root", type=Path, help="the VOCdevkit directory")
    voc.add_argument("--sets", type=_year_split, nargs="+", required=True, metavar="YEAR:SPLIT")
    voc.add_argument("--out", type=Path, required=True)

    check = commands.add_parser("check", help="validate a COCO json and its images")
    check.add_argument("coco_json", type=Path)
    check.add_argument("image_dir", type=Path)
    check.add_argument("--no-images", action="store_true", help="check the json only")
    check.add_argument("--max-messages", type=int, default=50)
    return parser


def _run_split(args: argparse.Namespace) -> int:
    if args.reference_offset is not None and args.seed != 0:
        print("error: --seed is not used with --reference-offset", file=sys.stderr)
        return 1
    scheme = scheme_name(args.seed, args.reference_offset)
    out_dir = args.out_dir or args.coco_json.parent / "semi_supervised" / scheme
    mode = (f"seed {args.seed}" if args.reference_offset is None
            else f"SoftTeacher's scheme, np.random.seed(fold + {args.reference_offset})")
    print(f"selection: {mode} (recorded in each file's info.ssod_split); into {out_dir}")
    for fold in args.fold:
        for percent in args.percent:
            paths = make_split(
                args.coco_json, out_dir, fold, percent, args.seed, args.reference_offset
            )
            print(f"fold {fold} @ {percent:g}%: {paths[0]} + {paths[1]}")
    return 0


def _run_voc(args: argparse.Namespace) -> int:
    summary = voc_to_coco(args.voc_root, args.sets, args.out)
    per_set = ", ".join(f"{name}: {count}" for name, count in summary["per_set"].items())
    print(
        f"wrote {summary['out_json']}: {summary['images']} images ({per_set}), "
        f"{summary['annotations']} annotations ({summary['difficult']} difficult)"
    )
    return 0


def _run_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.coco_json, args.image_dir, check_images=not args.no_images)
    print(format_report(report, max_messages=args.max_messages))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ssod-data``; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    mask_console()
    handlers = {"split": _run_split, "voc2coco": _run_voc, "check": _run_check}
    try:
        return handlers[args.command](args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
