"""Running a detector over a dataset: the detector rebuilt from a checkpoint, the loader,
the detections in original-image pixels, and COCO evaluation of them (gathered across processes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssod.checkpoint import CheckpointError, checkpoint_file, load_checkpoint
from ssod.config import compose
from ssod.data.coco import CategoryMap, DatasetError
from ssod.data.transforms import project_boxes

log = logging.getLogger(__name__)


def eval_loader(dataset, indices: list[int], batch_size: int = 4, num_workers: int = 0, pin_memory: bool = False):
    """A reusable loader of ``dataset[indices]`` for ``predict``.

    Build it once per run: its workers persist between evaluations, so an evaluation does
    not pay for starting them again (on a small validation set that was a third of its time).
    They stay alive, idle, between evaluations: ``num_workers`` processes per training process.
    """
    from ssod.data.sampling import worker_loader

    return worker_loader(dataset, num_workers, pin_memory, prefetch_factor=2, batch_size=batch_size, sampler=indices)


def shard(dataset, accelerator) -> list[int]:
    """This process's share of ``dataset``'s indices (every ``num_processes``-th one)."""
    return list(range(accelerator.process_index, len(dataset), accelerator.num_processes))


class EvaluationInterrupted(Exception):
    """A stop was requested during an evaluation, which was cut short (its metrics would be wrong)."""


@torch.no_grad()
def predict(detector: nn.Module, loader, device, should_stop=lambda: False, progress: Optional[str] = None) -> list[dict]:
    """Detections of the images of ``loader`` (see ``eval_loader``) in original-image pixels.

    Returns one dict per image: ``image_id``, ``boxes`` [K, 4] xyxy, ``scores`` [K],
    ``labels`` [K] (contiguous), all on the CPU; an image that could not be read gives
    ``{"image_id": id, "unreadable": True}`` (the loader gave its neighbour instead).
    ``should_stop()`` is asked before each batch; when true, ``EvaluationInterrupted`` is raised.
    ``progress``: a progress bar with that description (removed when done).
    """
    was_training = detector.training
    detector.eval()
    results = []
    # Iterating a DataLoader draws its base seed from the global RNG: fork it, so that an
    # evaluation never shifts the training's random stream (a resumed run equals a straight one).
    try:
        with torch.random.fork_rng(devices=[]):
            batches = loader
            if progress is not None:
                from tqdm.auto import tqdm

                batches = tqdm(loader, desc=progress, total=len(loader), leave=False, dynamic_ncols=True)
            for items, metas in batches:
                if should_stop():
                    raise EvaluationInterrupted
                outputs = detector([image.to(device, non_blocking=True) for image, _ in items])
                for (_, matrix), meta, (boxes, scores, labels) in zip(items, metas, detections_to_host(outputs)):
                    height, width = meta["size"]
                    inverse = torch.linalg.inv(matrix.double())
                    boxes, _ = project_boxes(boxes, inverse, width, height, min_size=0.0)
                    results.append({"image_id": meta["image_id"], "boxes": boxes, "scores": scores, "labels": labels})
                results.extend({"image_id": image_id, "unreadable": True}
                               for meta in metas for image_id in meta.get("bad_image_ids", ()))
    finally:
        detector.train(was_training)  # a cut-short or failed evaluation too
    return _one_per_image(results)


def _one_per_image(results: list[dict]) -> list[dict]:
    """Each image once: the loader stands a readable neighbour in for an unreadable image, so
    the neighbour's detections come twice, and an image may be reported unreadable more than
    once; the first of each is kept (detections first, then the unreadable ones)."""
    unique: dict[tuple[int, bool], dict] = {}
    for result in results:
        unique.setdefault((int(result["image_id"]), bool(result.get("unreadable"))), result)
    return list(unique.values())


def detections_to_host(outputs: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image (boxes [K, 4], scores [K], labels [K] int64) on the CPU, in one copy for the
    batch: one wait for the GPU instead of three per image. Labels travel as float32, exact
    for any class index below 2**24 (boxes and scores are float32 already: Float32Predictor)."""
    packed = torch.cat([
        torch.cat([out["boxes"].float(), out["scores"][:, None].float(), out["labels"][:, None].float()], dim=1)
        for out in outputs
    ]).cpu()
    parts = packed.split([len(out["boxes"]) for out in outputs])
    # Own storage for each (a view would carry the whole batch into every pickled result).
    return [(part[:, :4].clone(), part[:, 4].clone(), part[:, 5].long()) for part in parts]


def evaluate(detector: nn.Module, loader, accelerator, should_stop=lambda: False,
             progress: Optional[str] = None, save_to: Optional[Path] = None) -> Optional[dict[str, float]]:
    """COCO bbox metrics of ``detector`` on ``loader.dataset``, computed once on the main process.

    ``loader`` (``eval_loader`` over ``shard(dataset, accelerator)``) yields this process's
    shard; predictions are gathered as objects and evaluated once. Returns the metrics on
    the main process and None elsewhere. ``save_to``: also write the detections there
    (``write_detections``), so that the metrics can be recomputed, or bootstrapped over
    images, without the detector.
    """
    from ssod.evaluation import coco_evaluate, write_detections

    dataset = loader.dataset
    predictions = predict(detector, loader, accelerator.device, should_stop,
                          progress if accelerator.is_main_process else None)
    gathered = accelerator.gather_for_metrics(predictions, use_gather_object=True)
    if not accelerator.is_main_process:
        return None
    unique, unreadable = {}, set()
    for prediction in gathered:
        if prediction.get("unreadable"):
            unreadable.add(int(prediction["image_id"]))
        else:
            # A corrupt image is replaced by its neighbour in the dataset: count each id once.
            unique.setdefault(int(prediction["image_id"]), prediction)
    # An unreadable image would count all its objects as misses: a lower AP with no sign.
    # It is left out, and the metrics say how many images were evaluated and left out.
    image_ids = [image_id for image_id in dataset.image_ids if image_id not in unreadable]
    if unreadable:
        log.warning("%d validation images could not be read and are left out of the metrics: ids %s",
                    len(unreadable), sorted(unreadable)[:20])
    label_map = dataset.category_map.label_to_category_id
    metrics = coco_evaluate(dataset.coco, list(unique.values()), label_map, image_ids=image_ids)
    if save_to is not None:
        write_detections(save_to, list(unique.values()), label_map, image_ids)
    return {**metrics, "images": float(len(image_ids)), "unreadable_images": float(len(unreadable))}


def checkpoint_config(state: dict, overrides: list[str]) -> DictConfig:
    """The config to rebuild a checkpoint's model: composed from ``overrides`` when given,
    else the one the checkpoint carries (over the schema's defaults, so typed as ever), else
    (a checkpoint from before configs were stored) the default config."""
    if overrides or "config" not in state:
        return compose(list(overrides))
    base = compose([])
    return OmegaConf.merge(base, _known_keys(state["config"], OmegaConf.to_container(base)))


def _known_keys(saved, reference):
    """``saved`` without the keys today's config no longer has (e.g. ``method.polish`` of a
    checkpoint saved before methods chose their own networks): they cannot change the model."""
    if not isinstance(saved, dict) or not isinstance(reference, dict):
        return saved
    return {key: _known_keys(value, reference[key]) for key, value in saved.items() if key in reference}


def checkpoint_with_categories(given: str, score_thr: Optional[float], hint: str = "") -> tuple[Path, dict, DictConfig, CategoryMap]:
    """What a tool that runs a checkpoint alone needs (ssod-predict, ssod-export): its file
    (``given``: a file or a run's folder), state, config (``score_thr``, when given, as the
    detector's box score threshold) and the categories it carries (a ``DatasetError`` naming
    the file when it carries none; ``hint`` says what to do instead)."""
    path = checkpoint_file(given, "checkpoint", prefer_best=True)
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, [])
    if score_thr is not None:
        cfg.model.box_score_thresh = score_thr
    if "categories" not in state:
        raise DatasetError(f"{path}: the checkpoint carries no categories (saved before they were stored){hint}")
    categories = CategoryMap(tuple(state["categories"]["ids"]), tuple(state["categories"]["names"]))
    return path, state, cfg, categories


def load_detector(detector, weights: dict, source: str) -> None:
    """Load the ``detector.*`` part of a student or teacher state dict; the polishing
    networks are not needed to detect. A misfit is one clear error, not a list of sizes."""
    own = {key[len("detector."):]: value for key, value in weights.items() if key.startswith("detector.")}
    try:
        detector.load_state_dict(own)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise CheckpointError(f"{source}: the weights do not fit the model this config builds "
                              f"({'; '.join(line.strip() for line in first)}); leave out --overrides to use the "
                              "checkpoint's own config") from None
