"""Config composition: groups, experiments, overrides, typed schemas."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from ssod.config import compose, flatten


def test_default_is_polish_teacher_on_synthetic():
    cfg = compose()
    assert cfg.method.name == "polish_teacher"
    assert cfg.data.name == "synthetic"
    assert cfg.model.arch == "efficientnet_lite0_fpn" and cfg.model.weights_backbone == "IMAGENET"
    assert cfg.method.rf_cls_thr == 0.7994  # the synthetic study's, conf/experiment_method/
    assert compose(["~experiment_method"]).method.rf_cls_thr == 0.9  # the method's own


def test_overrides_and_experiments():
    cfg = compose(["method=soft_teacher", "train.iterations=7", "data.percent=5"])
    assert (cfg.method.name, cfg.train.iterations, cfg.data.percent) == ("soft_teacher", 7, 5.0)
    assert cfg.method.cls_pseudo_threshold == 0.9
    coco = compose(["experiment=coco_partial", "data.fold=2"])
    assert coco.model.arch == "resnet50_fpn" and coco.train.iterations == 180000
    assert coco.train.lr_steps == [120000, 160000] and coco.method.unsup_weight == 3.0
    assert coco.data.fold == 2
    voc = compose(["experiment=voc"])
    assert voc.method.unsup_weight == 1.0 and voc.train.batch_unlabeled == 1


def test_an_experiment_sets_a_method_s_weight_through_experiment_method():
    """conf/experiment_method/<experiment>_<method>.yaml: the synthetic recipe trains Polishing
    Teacher with the synthetic study's confirmed best values and Soft Teacher at weight 1.0; the
    paper's experiments keep the methods' own weights; the command line still wins;
    ~experiment_method leaves the methods' own settings (the method benchmark's arms)."""
    assert compose().method.unsup_weight == 0.3503 and compose().train.lr_gamma == 0.4697
    assert compose(["~experiment_method"]).method.unsup_weight == 3.0
    assert compose(["~experiment_method"]).train.lr_gamma == 0.1
    assert compose(["method=soft_teacher"]).method.unsup_weight == 1.0
    assert compose(["method=supervised"]).method.unsup_weight == 0.0
    assert compose(["method.unsup_weight=3.0"]).method.unsup_weight == 3.0
    assert compose(["experiment=coco_partial", "method=soft_teacher"]).method.unsup_weight == 4.0
    assert compose(["experiment=coco_partial"]).method.unsup_weight == 3.0
    assert compose(["experiment=voc", "method=soft_teacher"]).method.unsup_weight == 1.0


@pytest.mark.parametrize("experiment", ["coco_partial", "voc"])
def test_paper_experiments_freeze_the_teacher_after_the_first_lr_step_for_polish_teacher_only(experiment):
    """docs/method.md 3: the reference behaviour is the paper configs' value; Soft Teacher's
    reference keeps its teacher moving, and the built-in experiment does too."""
    from omegaconf import OmegaConf

    polish = compose([f"experiment={experiment}"])
    soft = compose([f"experiment={experiment}", "method=soft_teacher"])
    assert OmegaConf.to_object(polish.method).ema_freeze_after_first_lr_step is True
    assert flatten(polish)["method.ema_freeze_after_first_lr_step"] is True
    assert OmegaConf.to_object(soft.method).ema_freeze_after_first_lr_step is False
    assert compose(["experiment=synthetic"]).method.ema_freeze_after_first_lr_step is False
    off = compose([f"experiment={experiment}", "method.ema_freeze_after_first_lr_step=false"])
    assert off.method.ema_freeze_after_first_lr_step is False


def test_wrong_key_or_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["train.iterationz=3"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["train.iterations=many"])


def test_flatten_gives_dotted_resolved_keys():
    flat = flatten(compose(["train.run_name=abc", "+tracking.tags.where=${train.run_name}"]))
    assert flat["train.lr"] == 0.01
    assert flat["tracking.tags.where"] == "abc"  # interpolation resolved
    assert flat["method.cls_samples"] == [15, 15]


def test_evaluation_workers_default_to_none_on_a_cpu_and_num_workers_on_a_gpu():
    import torch

    from ssod.config import eval_workers

    data = compose(["data.num_workers=3"]).data
    assert eval_workers(data, torch.device("cpu")) == 0
    assert eval_workers(data, torch.device("cuda")) == 3
    assert eval_workers(compose(["data.eval_num_workers=2"]).data, torch.device("cpu")) == 2


@pytest.mark.parametrize("override, message", [
    ("train.iterations=-3", r"train.iterations=-3 \(must be >= 1\)"),
    ("train.log_every=0", r"train.log_every=0 \(must be >= 1\)"),
    ("data.percent=150", r"data.percent=150.0 \(must be in \(0, 100\]\)"),
    ("method.rf_cls_thr=1.5", r"method.rf_cls_thr=1.5 \(must be in \[0, 1\]\)"),
    ("model.anchor_sizes=[16,0,64,128,256]", r"model.anchor_sizes=\[16, 0, 64, 128, 256\] \(must be > 0\)"),
    ("method.polish_use=labels", r"method.polish_use=labels \(must be both, boxes, categories or none\)"),
    ("method.pseudo_labels=truth", r"method.pseudo_labels=truth \(must be teacher or oracle\)"),
    ("data.synthetic.num_test=-1", r"data.synthetic.num_test=-1 \(must be >= 0\)"),
    ("data.strong_erase_count=[-1,2]", r"data.strong_erase_count=\[-1, 2\] \(must be >= 0\)"),
])
def test_out_of_range_values_fail_at_compose_time(override, message):
    from ssod.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_every_bad_value_is_named_at_once_and_run_refuses_before_creating_anything(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from ssod.config import ConfigError
    from ssod.training import run

    cfg = compose()
    OmegaConf.update(cfg, "train.iterations", -3)
    OmegaConf.update(cfg, "train.ckpt_every", 0)
    OmegaConf.update(cfg, "train.output_dir", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"train.iterations=-3 .*train.ckpt_every=0"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no output folder


def test_a_checkpoints_config_with_keys_since_removed_still_rebuilds_its_model():
    """A checkpoint carries its run's resolved config; one saved before ``method.polish`` was
    removed (the method now decides) must still load in ``ssod-eval``."""
    from omegaconf import OmegaConf

    from ssod.inference import checkpoint_config

    saved = OmegaConf.to_container(compose(["method=supervised", "model.fpn_channels=48"]), resolve=True)
    saved["method"]["polish"] = False
    saved["train"]["gone_too"] = 1
    cfg = checkpoint_config({"config": saved}, [])
    assert cfg.method.name == "supervised" and cfg.model.fpn_channels == 48 and "polish" not in cfg.method
