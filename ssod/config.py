"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore.

The YAML groups under ``conf/`` (``data/``, ``model/``, ``method/``, ``train/``,
``tracking/``, ``tune/``, ``experiment/``) fill these schemas; a key that is not in a
schema, or a value of the wrong type, fails when the config is composed.

``compose(overrides)`` gives the same config ``ssod.train`` gets from the command line;
tests and ``ssod.tune`` use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class SyntheticConfig:
    """Recipe of the built-in synthetic dataset (see ``ssod.data.synthetic``)."""

    seed: int = 0
    num_train: int = 1200
    num_val: int = 200
    # A held-out test split, evaluated once at the end of a run (test/... metrics) and
    # never used for tuning or for choosing a checkpoint; 0: none.
    num_test: int = 0
    # Ranges (min, max) in pixels: image width and height are each drawn from image_size,
    # an object's side (geometric mean of width and height) from object_size.
    image_size: list[int] = field(default_factory=lambda: [128, 192])
    object_size: list[float] = field(default_factory=lambda: [10.0, 60.0])


@dataclass
class PastedConfig:
    """Recipe of the pasted testbed (see ``ssod.data.pasted``): real instances from a COCO
    source with masks, pasted onto real photographs."""

    # The source, read in place; relative paths are taken from the project directory.
    source_json: str = "../shared/data/coco128/annotations/instances_train2017.json"
    source_images: str = "../shared/data/coco128/train2017"
    seed: int = 0
    num_train: int = 1200
    # Unlabeled-only images that also hold distractors (instances of classes never labeled).
    num_open: int = 200
    num_val: int = 200
    num_test: int = 0
    num_classes: int = 8
    # Class k (0: the source's most frequent) is drawn with weight (k + 1) ** -tail.
    tail: float = 1.0
    image_size: list[int] = field(default_factory=lambda: [160, 224])
    object_size: list[float] = field(default_factory=lambda: [20.0, 110.0])


@dataclass
class DataConfig:
    """Where the images come from and how they are split and loaded.

    ``name: synthetic`` (or ``pasted``) generates the built-in dataset into ``cache_dir`` and
    splits its train set at ``fold``/``percent``. ``name: coco`` reads the json files given here;
    ``unlabeled_json`` may be empty for a supervised run. Relative paths are taken from
    the project directory (where the command was started).
    """

    name: str = "synthetic"
    train_json: str = ""
    train_images: str = ""
    unlabeled_json: str = ""
    unlabeled_images: str = ""
    val_json: str = ""
    val_images: str = ""
    # Optional held-out test set (COCO json and images), evaluated once at the end of a run.
    test_json: str = ""
    test_images: str = ""
    percent: float = 10.0
    fold: int = 1
    split_seed: int = 0
    split_reference_offset: Optional[int] = None
    cache_dir: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    pasted: PastedConfig = field(default_factory=PastedConfig)
    keep_images_without_annotations: bool = True
    train_min_sizes: list[int] = field(default_factory=lambda: [400, 1200])
    train_max_size: int = 1333
    # The strong view's geometric op (one of: translate x, translate y, rotate, shear x+y),
    # Soft Teacher's ranges by default. Rotation and shear map a box to the box enclosing
    # its turned corners, up to 37% (rotate 30) or 58% (shear 30) wider than the object:
    # the student then learns looser boxes from every target, the oracle's included.
    strong_translate: float = 0.1
    strong_rotate_deg: float = 30.0
    strong_shear_deg: float = 30.0
    # The strong view's photometric op (RandAugment-style, one per view) and its random
    # erasing (how many rectangles, each up to 20% of the width and height); [0, 0] erases none.
    strong_photometric: bool = True
    strong_erase_count: list[int] = field(default_factory=lambda: [1, 4])
    test_size: int = 800
    test_max_size: int = 1333
    num_workers: int = 2
    # Evaluation loader workers; null: num_workers on a GPU, 0 on a CPU, where workers
    # compete with the model for the same cores (measured: 94% of the model's throughput
    # in-process against 80% with 2 workers, on 2 cores).
    eval_num_workers: Optional[int] = None
    max_bad_image_fraction: float = 0.01
    val_max_images: Optional[int] = None


def eval_workers(cfg: DataConfig, device) -> int:
    """Workers of the evaluation loader on ``device`` (see ``DataConfig.eval_num_workers``)."""
    if cfg.eval_num_workers is not None:
        return cfg.eval_num_workers
    return cfg.num_workers if getattr(device, "type", str(device)) == "cuda" else 0


@dataclass
class ModelConfig:
    """torchvision Faster R-CNN (see ``ssod.models.detector.build_detector``)."""

    arch: str = "resnet50_fpn"
    weights_backbone: Optional[str] = None
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256
    box_head_dim: int = 1024
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100


@dataclass
class MethodConfig:
    """The training method and its reference hyper-parameters (docs/method.md)."""

    name: str = "supervised"
    unsup_weight: float = 0.0
    # Burn-in: the first ``unsup_start`` iterations train on labeled images only (no
    # unlabeled batch is drawn, the teacher only follows by EMA); then the unsupervised
    # weight ramps linearly from 0 to ``unsup_weight`` over ``unsup_warmup`` iterations.
    unsup_start: int = 0
    unsup_warmup: int = 0
    # Where pseudo labels come from: ``teacher`` (the method), or ``oracle``: the unlabeled
    # images' hidden ground truth through the same projection, views and losses, a
    # diagnostic upper bound that needs hidden ground truth and tags its run ssod.oracle.
    pseudo_labels: str = "teacher"
    ema_momentum: float = 0.999
    ema_include_buffers: bool = False
    ema_freeze_after_first_lr_step: bool = False
    pseudo_label_initial_score_thr: float = 0.5
    rpn_pseudo_threshold: float = 0.5
    cls_pseudo_threshold: float = 0.5
    background_weighting: bool = True
    reg_uncertainty_thr: Optional[float] = None
    reg_jitter_times: int = 10
    reg_jitter_scale: float = 0.06
    # Which polished pseudo labels are used (the ablations of docs/method.md 7): ``both``; ``boxes``
    # (box polishing only: classification keeps detections scoring above det_score_thr,
    # with their own labels); ``categories`` (category polishing only: regression targets
    # are the raw boxes); ``none`` (the networks train but neither is used).
    polish_use: str = "both"
    rf_cls_thr: float = 0.9
    det_score_thr: float = 0.9
    rf_vote_frac: float = 0.06
    reg_samples: int = 150
    reg_scale: float = 0.2
    cls_samples: list[int] = field(default_factory=lambda: [50, 50])
    cls_scales: list[float] = field(default_factory=lambda: [0.06, 0.2])
    cls_pos_iou: float = 0.7
    polish_hidden: int = 1024
    polish_box_weight: float = 1.0
    polish_cls_weight: float = 1.0
    polish_ema_momentum: float = 0.99
    polish_ema_warmup: int = 100


@dataclass
class TrainConfig:
    """Iteration-based schedule, batching, intervals and checkpointing."""

    iterations: int = 180000
    batch_labeled: int = 1
    batch_unlabeled: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [120000, 160000])
    lr_gamma: float = 0.1
    # no | fp16 | bf16, or null: whatever the launcher says (`accelerate launch
    # --mixed_precision`, `accelerate config`; plain `python`: no). An explicit value wins,
    # with a warning when the launcher said otherwise; the run logs the precision used.
    mixed_precision: Optional[str] = None
    # Speed settings (tests/test_performance.py compares each with the default path).
    # tf32: float32 matrix products and convolutions on CUDA in TF32 (true), or neither
    # (false); null leaves PyTorch's defaults (convolutions TF32, matrix products not).
    # TF32 changes float32 results by about 1e-3 relative; bf16/fp16 runs are unaffected.
    # channels_last: memory format of the convolutions (faster inference on tensor cores).
    tf32: Optional[bool] = None
    channels_last: bool = False
    seed: int = 0
    log_every: int = 50
    eval_every: int = 4000
    ckpt_every: int = 4000
    keep_checkpoints: int = 2
    # checkpoints/best.pt: the checkpoint of the evaluation with the highest value of this
    # validation metric (val/<teacher|student>/bbox_<AP, AP50, ...>); "" keeps none. ssod-eval,
    # ssod-predict and ssod-export take it when given a run's folder.
    best_metric: str = "val/teacher/bbox_AP"
    # null: a folder of its own for every new run, outputs/<method>-<data>/<start time>
    # (a Hydra multirun: Hydra's job folder), and resume=auto finds the run to continue;
    # see ssod/outputs.py. A path: exactly that folder.
    output_dir: Optional[str] = None
    # null: method, data, labeled fraction and fold, seed and the command line's other overrides.
    run_name: Optional[str] = None
    resume: Optional[str] = None
    init_from: Optional[str] = None
    # With init_from: false takes only the weights (student and teacher) and starts the
    # schedule at step 0; true continues the checkpoint's schedule in a new run and folder:
    # its step, learning rate, EMA counters and SGD momentum (matched by parameter name).
    init_continue: bool = False
    # Evaluate the held-out test split (data.test_json, or the synthetic num_test) once at the
    # end; a burn-in that only feeds other runs skips it.
    evaluate_test: bool = True
    max_consecutive_nonfinite: int = 5
    # DDP's search for parameters without a gradient after every backward pass. Every
    # parameter of the shipped methods gets one in every step (burn-in and semi-supervised
    # phase; tests/e2e/test_distributed.py), so the search is off: true for a method that
    # leaves some unused (DDP then stops with an error that names them).
    find_unused_parameters: bool = False
    grad_clip_norm: Optional[float] = None
    num_vis_images: int = 4
    cpu: bool = False
    progress: bool = True


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` empty means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project>/mlflow.db``."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "ssod"
    parent_run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    # One copy of a run's weights by default: its output folder's checkpoints (resume, best.pt,
    # ssod-eval/predict/export read them; they exist with tracking off or the server down).
    # The run's description names them. Opt-in copies in MLflow: the final checkpoint as an
    # artifact (output folders on scratch disks), and the logged model below.
    log_checkpoint_artifact: bool = False
    # MLflow's system metrics (CPU, memory, disk, network; NVIDIA GPUs too) in the run, every
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10). null: MLflow's
    # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING when set, else on.
    system_metrics: Optional[bool] = None
    # The final teacher detector as an MLflow logged model named "model" (PyTorch flavor,
    # mlflow.pytorch.load_model), registered as a version of registered_model_name when set
    # (a registered name logs the model whatever log_model says).
    log_model: bool = False
    registered_model_name: str = ""
    # How long one MLflow HTTP call waits on a server that does not answer: attempts of
    # request_timeout_s seconds, request_retries after the first (null: MLflow's
    # MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES when set, else 5 s and 1).
    # What a failed call did not send is held or spooled, never lost (ssod.tracking).
    request_timeout_s: Optional[int] = None
    request_retries: Optional[int] = None


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    train: TrainConfig = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: Any = None


def register_configs() -> None:
    """Register the schemas so YAML files can name them in their defaults lists."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="data", name="data_schema", node=DataConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="method", name="method_schema", node=MethodConfig)
    store.store(group="train", name="train_schema", node=TrainConfig)
    # The ``tune`` group's schema is registered by ``ssod.tuning.schema`` (the library below
    # does not know its tools); ``ssod-tune`` imports it before composing.


register_configs()


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, outside ``@hydra.main``.

    Example: ``compose(["experiment=synthetic", "train.iterations=10"])``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return validate(cfg) if config_name == "config" else cfg


class ConfigError(ValueError):
    """Config values out of their range; the message lists every one."""


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


# pycocotools' summary, in its order (ssod.evaluation names its results so).
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
_BEST_METRIC = re.compile(rf"val/(teacher|student)/bbox_({'|'.join(COCO_METRIC_NAMES)})")

_POSITIVE = ((lambda v: v > 0), "> 0")
_FRACTION = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_PERCENT = ((lambda v: 0 < v <= 100), "in (0, 100]")
# Dotted key -> (check, what it must be). A list's every element is checked; None passes
# (an optional value left unset). Only ranges: Hydra's schemas already check the types.
_RULES = {
    "data.percent": _PERCENT,
    "data.fold": _at_least(1),
    "data.num_workers": _at_least(0),
    "data.eval_num_workers": _at_least(0),
    "data.train_min_sizes": _at_least(1),
    "data.train_max_size": _at_least(1),
    "data.test_size": _at_least(1),
    "data.test_max_size": _at_least(1),
    "data.max_bad_image_fraction": _FRACTION,
    "data.val_max_images": _at_least(1),
    "data.strong_translate": _FRACTION,
    "data.strong_rotate_deg": ((lambda v: 0 <= v <= 180), "in [0, 180]"),
    "data.strong_shear_deg": ((lambda v: 0 <= v < 90), "in [0, 90)"),
    "data.strong_erase_count": _at_least(0),
    "data.synthetic.num_train": _at_least(1),
    "data.synthetic.num_val": _at_least(1),
    "data.synthetic.num_test": _at_least(0),
    "data.pasted.num_train": _at_least(1),
    "data.pasted.num_open": _at_least(0),
    "data.pasted.num_val": _at_least(1),
    "data.pasted.num_test": _at_least(0),
    "data.pasted.num_classes": _at_least(1),
    "data.pasted.tail": _at_least(0),
    "model.trainable_backbone_layers": _at_least(0),
    "model.fpn_channels": _at_least(1),
    "model.box_head_dim": _at_least(1),
    "model.anchor_sizes": _POSITIVE,
    "model.rpn_pre_nms_top_n_train": _at_least(1),
    "model.rpn_post_nms_top_n_train": _at_least(1),
    "model.rpn_pre_nms_top_n_test": _at_least(1),
    "model.rpn_post_nms_top_n_test": _at_least(1),
    "model.rpn_batch_size_per_image": _at_least(1),
    "model.box_batch_size_per_image": _at_least(1),
    "model.box_positive_fraction": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "model.box_score_thresh": _FRACTION,
    "model.box_nms_thresh": _FRACTION,
    "model.box_detections_per_img": _at_least(1),
    "method.unsup_weight": _at_least(0),
    "method.unsup_start": _at_least(0),
    "method.unsup_warmup": _at_least(0),
    "method.ema_momentum": _FRACTION,
    "method.pseudo_label_initial_score_thr": _FRACTION,
    "method.rpn_pseudo_threshold": _FRACTION,
    "method.cls_pseudo_threshold": _FRACTION,
    "method.reg_uncertainty_thr": _at_least(0),
    "method.reg_jitter_times": _at_least(1),
    "method.reg_jitter_scale": _at_least(0),
    "method.rf_cls_thr": _FRACTION,
    "method.det_score_thr": _FRACTION,
    "method.rf_vote_frac": _at_least(0),
    "method.reg_samples": _at_least(0),
    "method.reg_scale": _at_least(0),
    "method.cls_samples": _at_least(0),
    "method.cls_scales": _at_least(0),
    "method.cls_pos_iou": _FRACTION,
    "method.polish_hidden": _at_least(1),
    "method.polish_box_weight": _at_least(0),
    "method.polish_cls_weight": _at_least(0),
    "method.polish_ema_momentum": _FRACTION,
    "method.polish_ema_warmup": _at_least(0),
    "train.iterations": _at_least(1),
    "train.batch_labeled": _at_least(1),
    "train.batch_unlabeled": _at_least(1),
    "train.lr": _POSITIVE,
    "train.momentum": _FRACTION,
    "train.weight_decay": _at_least(0),
    "train.warmup_iters": _at_least(0),
    "train.warmup_factor": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "train.lr_steps": _at_least(0),
    "train.lr_gamma": _POSITIVE,
    "train.log_every": _at_least(1),
    "train.eval_every": _at_least(1),
    "train.ckpt_every": _at_least(1),
    "train.keep_checkpoints": _at_least(0),
    "train.max_consecutive_nonfinite": _at_least(1),
    "train.grad_clip_norm": _POSITIVE,
    "train.num_vis_images": _at_least(0),
    "train.best_metric": ((lambda v: v == "" or _BEST_METRIC.fullmatch(v) is not None),
                          f"\"\" or val/<teacher|student>/bbox_<{'|'.join(COCO_METRIC_NAMES)}>"),
    "tracking.request_timeout_s": _at_least(1),
    "tracking.request_retries": ((lambda v: 0 <= v <= 10), "in [0, 10]"),
    "train.mixed_precision": ((lambda v: v in ("no", "fp16", "bf16", "fp8")), "no, fp16, bf16 or fp8 (or null: the launcher's)"),
    "method.pseudo_labels": ((lambda v: v in ("teacher", "oracle")), "teacher or oracle"),
    "method.polish_use": ((lambda v: v in ("both", "boxes", "categories", "none")), "both, boxes, categories or none"),
}


def validate(cfg: DictConfig) -> DictConfig:
    """Check every numeric value's range (``_RULES``) before anything runs; returns ``cfg``.

    Raises ``ConfigError`` naming each bad key, its value and its range: a negative
    ``train.iterations`` would otherwise "finish" at once, ``train.log_every=0`` divide by
    zero once the MLflow run exists, ``data.percent=150`` train on 100% and log 150.
    """
    problems = []
    for key, (check, rule) in _RULES.items():
        # Each value alone: a string elsewhere may hold an interpolation only Hydra's app resolves.
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, ListConfig):
            value = list(value)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v is not None and not check(v)]
        if bad:
            problems.append(f"{key}={value} (must be {rule})")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.lr": 0.01, ...}`` with interpolations resolved."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
