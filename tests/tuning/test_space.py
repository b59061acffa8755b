"""Optuna parameter spaces (``ssod.tuning.space``): sampled values become Hydra overrides that compose."""

from __future__ import annotations


import optuna
import pytest

from ssod.tune import prepare
from ssod.tuning.settings import tune_config
from ssod.tuning.space import override
from ssod.tuning.space import suggest, to_overrides
from tuning_project import STUDY, Project


def test_space_becomes_overrides_that_compose(project: Project) -> None:
    setup = prepare(project.overrides + ["train.iterations=7"])
    assert setup.tune.study_name == STUDY and setup.tune.n_trials == 3
    assert setup.storage_url == f"sqlite:///{project.root / 'optuna.db'}"
    assert setup.fixed_overrides[-1] == "train.iterations=7"
    trial = optuna.trial.FixedTrial({
        "method.unsup_weight": 2.5, "method.rf_cls_thr": 0.75, "method.cls_scales.1": 0.125,
        "method.reg_samples": 12, "method.background_weighting": False,
    })
    params = suggest(trial, setup.tune.space)
    from ssod.config import compose

    awkward = "/tmp/a b/it's=[x],{y}"
    cfg = compose(setup.fixed_overrides + to_overrides(params) + [override("train.output_dir", awkward)])
    assert cfg.train.output_dir == awkward
    assert cfg.method.unsup_weight == 2.5 and cfg.method.rf_cls_thr == 0.75
    assert list(cfg.method.cls_scales) == [0.06, 0.125]
    assert cfg.method.reg_samples == 12 and cfg.method.background_weighting is False
    assert cfg.train.iterations == 7

    with pytest.raises(ValueError, match="needs low <= high"):
        tune_config({"space": {"method.unsup_weight": {"type": "float", "low": 2.0}}})
    with pytest.raises(ValueError, match="log needs low > 0"):
        tune_config({"space": {"method.unsup_weight": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}})
    with pytest.raises(ValueError, match="pruner.name"):
        tune_config({"pruner": {"name": "sometimes"}})


def test_enqueue_grid_enqueues_every_choice_after_the_named_configurations(project: Project) -> None:
    setup = prepare(["tune=method_lr", "tune.space={train.lr_gamma: {type: categorical, choices: [0.5, 2.0]}}",
                     "+tune.enqueue.mine={train.lr_gamma: 0.7}"], project_dir=project.root)
    assert setup.enqueued_params() == [("mine", {"train.lr_gamma": 0.7}), ("train.lr_gamma=0.5", {"train.lr_gamma": 0.5}),
                                       ("train.lr_gamma=2.0", {"train.lr_gamma": 2.0})]
    assert [name for name, _ in prepare(["tune=method_lr"], project_dir=project.root).enqueued_params()] == [
        "train.lr_gamma=0.1", "train.lr_gamma=0.3", "train.lr_gamma=1.0"]
