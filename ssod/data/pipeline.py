"""Build the labeled, unlabeled and validation datasets from the data config.

``build_data(cfg.data, project_dir)`` is the only place that reads the data config. It
resolves the files (generating a built-in testbed, synthetic or pasted, or the
fold@percent split files, on first use), checks that every split shares one category map, and wraps each split
with its view:

- labeled items: ``(image [3,H,W], target in view pixels, matrix [3,3])``
- unlabeled items: ``(weak View, strong View, hidden target in original pixels)``; the
  hidden target is read only to measure pseudo-label quality, never to train
- validation items: ``(image [3,H,W], matrix [3,3])``
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ssod.config import DataConfig
from ssod.data.cache import default_cache_dir
from ssod.data.coco import CategoryMap, CocoDetection, DatasetError, load_split
from ssod.data.pasted import PastedPaths, PastedRecipe, ensure_pasted, with_open_images
from ssod.data.splits import make_split, scheme_name, split_paths
from ssod.data.synthetic import SyntheticPaths, SyntheticRecipe, ensure_synthetic
from ssod.data.transforms import EvalTransform, LabeledTransform, WeakStrongTransform


class LabeledView:
    def __init__(self, transform: LabeledTransform) -> None:
        self.transform = transform

    def __call__(self, image, target, generator):
        return self.transform(image, target, generator)


class UnlabeledView:
    def __init__(self, transform: WeakStrongTransform) -> None:
        self.transform = transform

    def __call__(self, image, target, generator):
        weak, strong = self.transform(image, generator)
        return weak, strong, target


class EvalView:
    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, image, target, generator):
        view, _, matrix = self.transform(image)
        return view, matrix


@dataclass
class DataFiles:
    """Resolved annotation files and image directories (``unlabeled_json`` may be None)."""

    train_json: Path
    train_images: Path
    unlabeled_json: Optional[Path]
    unlabeled_images: Optional[Path]
    val_json: Path
    val_images: Path
    source_json: Optional[Path] = None  # the json the labeled/unlabeled split files were made from
    test_json: Optional[Path] = None  # the held-out test set, if any
    test_images: Optional[Path] = None


@dataclass
class DataBundle:
    files: DataFiles
    category_map: CategoryMap
    labeled: CocoDetection
    unlabeled: Optional[CocoDetection]
    val: CocoDetection
    test: Optional[CocoDetection] = None

    def named_sets(self) -> list[tuple[str, CocoDetection]]:
        """(name, dataset) of each set a run reads: train, unlabeled (not when supervised),
        eval, test (when there is one); the names are MLflow's dataset contexts."""
        sets = (("train", self.labeled), ("unlabeled", self.unlabeled), ("eval", self.val), ("test", self.test))
        return [(name, dataset) for name, dataset in sets if dataset is not None]

    def counts(self) -> dict[str, float]:
        """``data/<set>/{images,boxes,degenerate_boxes,clipped_boxes}`` of the sets a run reads."""
        counts = {}
        for name, dataset in self.named_sets():
            counts.update({f"data/{name}/images": len(dataset), f"data/{name}/boxes": dataset.box_count,
                           f"data/{name}/degenerate_boxes": dataset.degenerate_boxes,
                           f"data/{name}/clipped_boxes": dataset.clipped_boxes})
        return counts


def _absolute(path: str, project_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (project_dir / candidate)


def resolve_files(cfg: DataConfig, project_dir: Path) -> DataFiles:
    """Turn the data config into concrete files, generating what is missing."""
    files = _resolve_training_files(cfg, project_dir)
    if cfg.name == "synthetic" and cfg.synthetic.num_test:
        paths = SyntheticPaths.under(files.val_json.parent.parent)
        files.test_json, files.test_images = paths.test_json, paths.test_images
    elif cfg.name == "pasted" and cfg.pasted.num_test:
        paths = PastedPaths(files.val_json.parent.parent)
        files.test_json, files.test_images = paths.test_json, paths.images("test")
    elif cfg.test_json:
        files.test_json = _absolute(cfg.test_json, project_dir)
        files.test_images = _absolute(cfg.test_images or cfg.val_images, project_dir)
    return files


def _resolve_training_files(cfg: DataConfig, project_dir: Path) -> DataFiles:
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cfg.name == "synthetic":
        synthetic = cfg.synthetic
        recipe = SyntheticRecipe(
            seed=synthetic.seed, num_train=synthetic.num_train, num_val=synthetic.num_val, num_test=synthetic.num_test,
            image_size=tuple(synthetic.image_size), object_size=tuple(synthetic.object_size),
        )
        paths = ensure_synthetic(cache / "synthetic", recipe)
        source, source_images = paths.train_json, paths.train_images
        val_json, val_images = paths.val_json, paths.val_images
        split_dir = paths.root / "splits"
    elif cfg.name == "pasted":
        pasted = _pasted_testbed(cfg, project_dir, cache)
        source, source_images = pasted.train_json, pasted.images("train")
        val_json, val_images = pasted.val_json, pasted.images("val")
        split_dir = pasted.root / "splits"
    else:
        if not cfg.train_json:
            raise ValueError("data.train_json is required for a COCO-format dataset")
        source = _absolute(cfg.train_json, project_dir)
        source_images = _absolute(cfg.train_images, project_dir)
        val_json, val_images = _absolute(cfg.val_json, project_dir), _absolute(cfg.val_images, project_dir)
        if cfg.unlabeled_json:
            unlabeled_images = _absolute(cfg.unlabeled_images or cfg.train_images, project_dir)
            return DataFiles(source, source_images, _absolute(cfg.unlabeled_json, project_dir), unlabeled_images, val_json, val_images)
        split_dir = None  # keyed by the json's version: looked at only when a split is needed
    if cfg.percent >= 100:
        return DataFiles(source, source_images, None, None, val_json, val_images)
    split_dir = split_dir or _coco_split_dir(cache, source)
    # One directory per selection scheme (the files keep SoftTeacher's names): another
    # split_seed or reference offset must not reuse a split made with the first.
    scheme = scheme_name(cfg.split_seed, cfg.split_reference_offset)
    labeled, unlabeled = split_paths(source, split_dir / scheme, cfg.fold, cfg.percent)
    if not (labeled.is_file() and unlabeled.is_file()):
        make_split(source, split_dir / scheme, cfg.fold, cfg.percent, cfg.split_seed, cfg.split_reference_offset)
    if cfg.name == "pasted":  # its open images are never labeled, whatever the split
        unlabeled = with_open_images(unlabeled, pasted)
    return DataFiles(labeled, source_images, unlabeled, source_images, val_json, val_images, source)


def _pasted_testbed(cfg: DataConfig, project_dir: Path, cache: Path) -> PastedPaths:
    pasted = cfg.pasted
    recipe = PastedRecipe(
        seed=pasted.seed, num_train=pasted.num_train, num_open=pasted.num_open, num_val=pasted.num_val,
        num_test=pasted.num_test, num_classes=pasted.num_classes, tail=pasted.tail,
        image_size=tuple(pasted.image_size), object_size=tuple(pasted.object_size),
    )
    return ensure_pasted(cache / "pasted", _absolute(pasted.source_json, project_dir),
                         _absolute(pasted.source_images, project_dir), recipe)


def _coco_split_dir(cache: Path, source: Path) -> Path:
    """Where the splits of ``source`` live: keyed by its path, size and modification time,
    so a json replaced in place gets new splits, not the old file's."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: COCO json file not found (data.train_json)")
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache / "splits" / hashlib.sha256(key.encode()).hexdigest()[:12]


def _from_user_file(files: DataFiles, load):
    """``load()``, with a fault found in a split file made in the cache reported against the
    user's json it was made from (the file to fix)."""
    try:
        return load()
    except DatasetError as error:
        if files.source_json is None or str(files.source_json) in str(error):
            raise
        raise DatasetError(f"{files.source_json} (data.train_json; found in the split made from it): {error}") from error


def build_data(cfg: DataConfig, project_dir: Path, need_unlabeled: bool) -> DataBundle:
    """Datasets for training (labeled, unlabeled if ``need_unlabeled``) and validation."""
    files = resolve_files(cfg, project_dir)
    labeled_view = LabeledView(LabeledTransform(cfg.train_min_sizes, cfg.train_max_size))
    labeled = _from_user_file(files, lambda: load_split(files.train_json, files.train_images, None, labeled_view,
                                                        cfg.keep_images_without_annotations))
    if labeled.box_count == 0:
        raise DatasetError(f"{files.source_json or files.train_json}: the labeled images ({len(labeled)} of {files.train_json.name}) have no "
                           f"usable box ({labeled.degenerate_boxes} degenerate): a detector cannot learn from them")
    category_map = labeled.category_map
    unlabeled = None
    if need_unlabeled:
        if files.unlabeled_json is None:
            raise ValueError("this method needs unlabeled images: set data.percent < 100 or data.unlabeled_json")
        weak_strong = UnlabeledView(WeakStrongTransform(
            cfg.train_min_sizes, cfg.train_max_size, max_rotate_deg=cfg.strong_rotate_deg,
            max_translate=cfg.strong_translate, max_shear_deg=cfg.strong_shear_deg,
            erase_count=_erase_count(cfg.strong_erase_count), photometric=cfg.strong_photometric,
        ))
        unlabeled = _from_user_file(files, lambda: load_split(files.unlabeled_json, files.unlabeled_images, category_map,
                                                              weak_strong))
    eval_view = EvalView(EvalTransform(cfg.test_size, cfg.test_max_size))
    val = load_split(files.val_json, files.val_images, category_map, eval_view)
    if cfg.val_max_images is not None:
        val.keep_first(cfg.val_max_images)
    test = None
    if files.test_json is not None:
        test = load_split(files.test_json, files.test_images, category_map, eval_view)
    return DataBundle(files, category_map, labeled, unlabeled, val, test)


def _erase_count(count) -> tuple[int, int]:
    """``data.strong_erase_count`` as (fewest, most) rectangles."""
    if len(count) != 2 or count[0] > count[1]:
        raise ValueError(f"data.strong_erase_count must be [fewest, most] with fewest <= most, got {list(count)}")
    return int(count[0]), int(count[1])
