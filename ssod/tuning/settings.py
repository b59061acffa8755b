"""Loading the ``tune`` config group (``conf/tune/*.yaml``) and writing Hydra overrides.

A study is one file of the group (schema: ``ssod/tuning/schema.py``), e.g.::

    defaults: [tune_schema, _self_]
    study_name: synthetic-polish
    n_trials: 24                       # global budget, shared by every worker
    metric: val/teacher/bbox_AP        # any metric the training reports
    direction: maximize
    base_overrides: [experiment=synthetic, train.iterations=300]
    space:
      method.unsup_weight: {type: float, low: 0.5, high: 6.0, log: true}
      method.cls_scales.0: {type: float, low: 0.02, high: 0.15}
      method.reg_samples: {type: int, low: 20, high: 60, step: 10}

``load_setup(overrides)`` composes it with ``ssod.config.compose`` (a misspelt key fails
at start), checks the values, composes the trials' base config once (so a bad base
override fails now, not in trial 1) and resolves every path and URI once.
"""

from __future__ import annotations

import itertools

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ssod.config import compose
from ssod.mlflow_client import default_tracking_uri
from ssod.tuning.schema import ParamSpec, PrunerSpec, SamplerSpec, TuneConfig
from ssod.tuning.space import check_space, override

__all__ = ["ParamSpec", "PrunerSpec", "SamplerSpec", "TuneConfig", "StudySetup", "load_setup", "override", "tune_config"]

DEFAULT_TUNE = "synthetic"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class StudySetup:
    """Everything a worker needs, resolved once: absolute paths, URIs, fixed overrides.

    ``fixed_overrides``: ``tune.base_overrides`` then the non-``tune`` overrides of the
    command line; every trial composes ``fixed_overrides + its own``.
    ``cli_overrides``: the command line as given, to start more workers with.
    """

    tune: TuneConfig
    project_dir: Path
    study_dir: Path
    fixed_overrides: list[str]
    cli_overrides: list[str]
    tracking_uri: str
    experiment: str
    storage_url: str = ""
    # The trials' base config value of every space key (what ``tune.enqueue`` leaves out).
    space_defaults: dict[str, Any] = field(default_factory=dict)
    # The trials' tracking.request_timeout_s and tracking.request_retries (None: the defaults).
    request_bounds: tuple[Optional[int], Optional[int]] = (None, None)

    def enqueued_params(self) -> list[tuple[str, dict[str, Any]]]:
        """``tune.enqueue`` as (name, full parameter dict) pairs, in order, then with
        ``tune.enqueue_grid`` every combination of the categorical choices (named
        ``key=value,...``)."""
        named = [(name, {key: values.get(key, self.space_defaults.get(key)) for key in self.tune.space})
                 for name, values in self.tune.enqueue.items()]
        if not self.tune.enqueue_grid:
            return named
        grid = {key: list(spec.choices) for key, spec in self.tune.space.items() if spec.type == "categorical"}
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        return named + [(",".join(f"{key}={value}" for key, value in combo.items()),
                         {key: combo.get(key, self.space_defaults.get(key)) for key in self.tune.space})
                        for combo in combos]


def is_tune_override(text: str) -> bool:
    key = text.lstrip("+~").split("=", 1)[0]
    return key == "tune" or key.startswith("tune.")


def compose_with_tune(overrides: list[str]) -> DictConfig:
    """``compose`` that also accepts ``tune=<name>`` when ``conf/config.yaml`` has no
    ``tune`` entry in its defaults list (then Hydra wants ``+tune=<name>``)."""
    from hydra.errors import ConfigCompositionException

    try:
        return compose(overrides)
    except ConfigCompositionException as error:
        if "No match in the defaults list" not in str(error):
            raise
        return compose([f"+{o}" if o.startswith("tune=") else o for o in overrides])


def load_setup(overrides: list[str], project_dir: Optional[Path] = None) -> StudySetup:
    """Compose ``tune=<name>`` (default ``synthetic``) and the base config of the trials."""
    project_dir = Path(project_dir or Path.cwd()).resolve()
    overrides = list(overrides)
    if not any(o.lstrip("+").startswith("tune=") for o in overrides):
        overrides.insert(0, f"tune={DEFAULT_TUNE}")
    tune_part = [o for o in overrides if is_tune_override(o)]
    fixed_cli = [o for o in overrides if not is_tune_override(o)]
    cfg = compose_with_tune(tune_part + fixed_cli)
    tune = tune_config(cfg.tune)
    fixed = [*tune.base_overrides, *fixed_cli]
    base = compose(fixed)  # the config every trial starts from: fails now, not in trial 1
    output_dir = Path(tune.output_dir).expanduser()
    study_dir = (output_dir if output_dir.is_absolute() else project_dir / output_dir) / tune.study_name
    missing = sorted({key for values in tune.enqueue.values() for key in values} - set(tune.space))
    if missing:
        raise ValueError(f"invalid tune config: tune.enqueue names keys outside tune.space: {', '.join(missing)}")
    defaults = {key: OmegaConf.select(base, key, throw_on_missing=False) for key in tune.space}
    unknown = sorted(key for key, value in defaults.items() if value is None)
    if unknown:
        raise ValueError(f"invalid tune config: tune.space keys that the trials' config lacks: {', '.join(unknown)}")
    return StudySetup(
        tune=tune,
        project_dir=project_dir,
        study_dir=study_dir,
        fixed_overrides=fixed,
        cli_overrides=overrides,
        tracking_uri=base.tracking.uri or default_tracking_uri(project_dir),
        experiment=base.tracking.experiment,
        space_defaults=defaults,
        request_bounds=(base.tracking.request_timeout_s, base.tracking.request_retries),
    )


def tune_config(node: Any) -> TuneConfig:
    """Check a composed ``tune`` node against ``TuneConfig`` and the allowed names."""
    if node is None:
        raise ValueError("no study config: pass tune=<name> (a file of conf/tune/)")
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    tune: TuneConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TuneConfig), data))
    problems = []
    if not _NAME.match(tune.study_name):
        problems.append(f"study_name={tune.study_name!r}: use letters, digits, '_', '.', '-'")
    if tune.direction not in ("maximize", "minimize"):
        problems.append(f"direction={tune.direction!r}: maximize or minimize")
    if tune.launcher not in ("inprocess", "accelerate"):
        problems.append(f"launcher={tune.launcher!r}: inprocess or accelerate")
    if tune.sampler.name not in ("tpe", "random"):
        problems.append(f"sampler.name={tune.sampler.name!r}: tpe or random")
    if tune.pruner.name not in ("successive_halving", "hyperband", "median", "threshold", "none"):
        problems.append(f"pruner.name={tune.pruner.name!r}: successive_halving, hyperband, median, threshold or none")
    if tune.n_trials < 1 or tune.processes_per_trial < 1:
        problems.append("n_trials and processes_per_trial must be at least 1")
    if tune.storage_outage_s < 0:
        problems.append(f"storage_outage_s={tune.storage_outage_s}: seconds, 0 or more")
    if tune.grace_period <= tune.heartbeat_interval:
        problems.append("grace_period must be longer than heartbeat_interval")
    if problems:
        raise ValueError("invalid tune config: " + "; ".join(problems))

    check_space(tune.space)
    return tune

