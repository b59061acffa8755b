"""Schema of the ``tune`` config group (``conf/tune/*.yaml`` start with ``defaults: [tune_schema]``).

Only dataclasses here: ``ssod.config`` registers ``TuneConfig`` with Hydra's ConfigStore, so
a misspelt ``tune.<key>`` fails when the config is composed, like any other group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ParamSpec:
    """One searched value. ``type``: float | int | categorical.

    float/int take ``low``, ``high`` and optionally ``log`` or ``step``; categorical takes
    ``choices`` (numbers, strings, booleans). The parameter's name is the Hydra key it
    sets (``method.unsup_weight``; ``method.cls_scales.0`` for a list element).
    """

    type: str = "float"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


@dataclass
class SamplerSpec:
    """``tpe`` (default) or ``random``. Worker k of a launcher samples with ``seed + k``."""

    name: str = "tpe"
    seed: Optional[int] = 0
    n_startup_trials: int = 8
    multivariate: bool = True
    constant_liar: bool = True


@dataclass
class PrunerSpec:
    """``successive_halving`` (asynchronous), ``hyperband``, ``median``, ``threshold``
    (outside ``[lower, upper]``) or ``none``.

    Steps are training iterations counted from the start of the unsupervised phase
    (``method.unsup_start``), so ``n_warmup_steps``/``min_resource`` count those; a trial's
    final evaluation is never pruned.
    """

    name: str = "median"
    n_startup_trials: int = 4
    n_warmup_steps: int = 0
    interval_steps: int = 1
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    lower: Optional[float] = None
    upper: Optional[float] = None


@dataclass
class TuneConfig:
    """A study: what to search, how to judge a trial, where the trials are kept.

    ``storage``: empty means ``$SSOD_OPTUNA_STORAGE``, else ``sqlite:///<project>/optuna.db``
    for one worker and the journal file ``<project>/optuna.journal`` for several.
    ``launcher``: ``inprocess`` (a trial runs in its worker) or ``accelerate`` (the worker
    runs ``accelerate launch`` with ``processes_per_trial`` processes for each trial).
    """

    study_name: str = "ssod"
    storage: str = ""
    n_trials: int = 20
    timeout_s: Optional[float] = None
    metric: str = "val/teacher/bbox_AP"
    direction: str = "maximize"
    base_overrides: list[str] = field(default_factory=list)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    # Named configurations tried first, in order (name -> {space key: value}); a space key left
    # out takes the trials' base config value, so ``default: {}`` is the recipe as shipped.
    # Enqueued once, when the study is created: the study can only improve on them.
    enqueue: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Also enqueue every combination of the categorical keys' choices (a grid), after the named
    # ones: with n_trials the grid's size, every value trains once (the method benchmark's
    # learning-rate choice, conf/tune/method_lr.yaml). The other keys take the base config's value.
    enqueue_grid: bool = False
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    output_dir: str = "outputs/tune"
    # Iterations of a supervised burn-in trained once for the study's base config and
    # continued by every trial (0: each trial trains from the start); in burn_in_dir, default
    # <output_dir>/burn-ins (a path every machine sees). See ssod/tuning/burn_in.py.
    burn_in: int = 0
    burn_in_dir: str = ""
    # ssod-tune confirm: the seeds (labeled splits) the best, default and paper configurations
    # are trained again on, and what gives those runs a held-out test split.
    confirm_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    confirm_overrides: list[str] = field(default_factory=list)
    keep_checkpoints: bool = False
    heartbeat_interval: int = 10
    grace_period: int = 60
    # How long a worker waits out an RDB storage that stopped answering (a database restart,
    # a network cut), retrying every call, before it gives up in one line. A trial whose
    # heartbeat stopped for longer than grace_period may be failed and re-queued by another
    # worker once the database is back: keep grace_period above the outages to ride out.
    storage_outage_s: float = 120.0
    max_retry: int = 2
    launcher: str = "inprocess"
    processes_per_trial: int = 1
    accelerate_args: list[str] = field(default_factory=list)
    wait_for_running: bool = True
    poll_interval_s: float = 5.0
    max_worker_restarts: int = 3
    plots: bool = True


def register_tune_schema() -> None:
    """``tune_schema`` for the ``tune`` config group (``conf/tune/*.yaml`` name it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="tune", name="tune_schema", node=TuneConfig)


register_tune_schema()
