"""The study in MLflow: one parent run per study, a nested run per trial, the report.

Runs are found by tags, never remembered: the parent carries ``optuna.study=<name>`` and
``optuna.role=study``; a trial's run (created by ``ssod.training.run`` with
``tracking.parent_run_id``) carries ``optuna.study``, ``optuna.role=trial`` and
``optuna.trial_number``, and after the trial ``optuna.state`` COMPLETE/PRUNED/FAIL with the
run status FINISHED/KILLED/FAILED to match (a trial stopped on request and re-queued: FAIL,
tagged ``optuna.interrupted=true``, and KILLED). ``write_report`` puts the best parameters, the
best trial's run id, counts, a trials table and plots on the parent run.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from ssod.config import flatten
from ssod.masking import mask_secrets
from ssod.mlflow_view import run_route
from ssod.tracking import Tracker
from ssod.tuning.settings import StudySetup
from ssod.tuning.storage import ENQUEUED_ATTR, INTERRUPTED_ATTR, INTERRUPTED_TRIALS, SURPLUS_ATTR

log = logging.getLogger(__name__)

RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}


def _tracker(setup: StudySetup) -> Tracker:
    return Tracker(setup.tracking_uri, setup.experiment)


def trial_tags(study_name: str, trial_number: int, original_number: Optional[int] = None) -> dict[str, str]:
    tags = {"optuna.study": study_name, "optuna.role": "trial", "optuna.trial_number": str(trial_number)}
    if original_number is not None:
        tags["optuna.retry_of"] = str(original_number)
    return tags


def find_parent_run(setup: StudySetup) -> Optional[str]:
    """The study's parent run, if there is one (read only)."""
    found = _tracker(setup).find_runs({"optuna.study": setup.tune.study_name, "optuna.role": "study"})
    return found[0] if found else None


def parent_run(setup: StudySetup, reopen: bool = False) -> str:
    """Find the study's parent run by tag, or create it (the oldest wins a creation race).

    ``reopen``: mark a found run RUNNING again (a launcher joining or extending the study).
    """
    tracker = _tracker(setup)
    tags = {"optuna.study": setup.tune.study_name, "optuna.role": "study"}
    found = tracker.find_runs(tags)
    if found:
        if reopen:
            tracker.start(f"study-{setup.tune.study_name}", run_id=found[0])
            _say_where(tracker)
        return found[0]
    own = tracker.start(f"study-{setup.tune.study_name}", tags)
    tracker.log_params(_study_params(setup))
    found = tracker.find_runs(tags)
    if found and found[0] != own:
        # Another launcher created one at the same moment: keep theirs, retire ours.
        tracker.set_tags({"optuna.role": "duplicate"})
        tracker.end("KILLED")
        return found[0]
    _say_where(tracker)
    return own


def _say_where(tracker: Tracker) -> None:
    """The study's parent run in MLflow's UI (its trials nest under it), for the console."""
    if tracker.run_id:
        log.info("the study's MLflow run %s; see it: %s", tracker.run_id, tracker.links())


def _study_params(setup: StudySetup) -> dict:
    tune = setup.tune
    space = {name: {k: v for k, v in vars(spec).items() if v is not None} for name, spec in tune.space.items()}
    return {
        "study_name": tune.study_name,
        "storage": mask_secrets(setup.storage_url),
        "metric": tune.metric,
        "direction": tune.direction,
        "n_trials": tune.n_trials,
        "launcher": tune.launcher,
        "processes_per_trial": tune.processes_per_trial,
        "base_overrides": " ".join(setup.fixed_overrides),
        "space": json.dumps(space, sort_keys=True),
        **flatten({"sampler": vars(tune.sampler), "pruner": vars(tune.pruner)}),
    }


def trial_run_id(setup: StudySetup, trial_number: int) -> Optional[str]:
    found = _tracker(setup).find_runs(trial_tags(setup.tune.study_name, trial_number))
    return found[-1] if found else None


def mark_trial_run(setup: StudySetup, trial_number: int, state: str, params: Optional[dict] = None) -> Optional[str]:
    """Tag the trial's run ``optuna.state=<state>``, set the matching status, log the params."""
    run_id = trial_run_id(setup, trial_number)
    if run_id is None:
        return None  # the trial failed before its training opened a run
    tracker = _tracker(setup)
    tracker.run_id = run_id
    if params:
        tracker.log_params({f"optuna.{name}": value for name, value in params.items()})
    if state == "INTERRUPTED":  # stopped on request and re-queued: FAIL for Optuna, not a failure
        tracker.set_tags({"optuna.state": "FAIL", "optuna.interrupted": "true"})
    else:
        tracker.set_tags({"optuna.state": state})
        tracker.delete_tag("optuna.interrupted")  # a retry that continued the stopped trial's run
    tracker.end(RUN_STATUS[state])
    return run_id


def end_parent_run(setup: StudySetup, parent_run_id: Optional[str], status: str, note: str) -> None:
    """End the study's run ``status`` without the study (its database is away), with ``note``
    ahead of its description (best effort: a tracking failure is a warning)."""
    if not parent_run_id:
        return
    tracker = _tracker(setup)
    tracker.run_id = parent_run_id
    described = tracker.current_tag("mlflow.note.content") or ""
    tracker.describe(f"{note}\n\n{described}".strip())
    tracker.end(status)


def write_report(setup: StudySetup, study: optuna.Study, parent_run_id: Optional[str], status: Optional[str] = None) -> dict:
    """Best trial, counts, trials table and plots onto the parent run, then close it with
    ``status`` (FINISHED when the budget is spent, KILLED when stopped; None: still open).
    ``parent_run_id`` None: the summary only, nothing logged."""
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    tracker = _tracker(setup) if parent_run_id else Tracker(setup.tracking_uri, setup.experiment, enabled=False)
    tracker.run_id = parent_run_id
    summary: dict = {"study": setup.tune.study_name, "trials": len(trials), **states}
    finished = sum(t.state.is_finished() for t in trials)
    tracker.log_metrics({f"study/{name}": count for name, count in states.items()}, step=finished)
    best = best_trial(study)
    if best is not None:
        best_run = trial_run_id(setup, best.number)
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params, best_run_id=best_run)
        tied = sum(t.value == best.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if tied > 1:
            # The first of them is reported: the metric does not tell them apart.
            summary["best_tied_trials"] = tied
            tracker.set_tags({"optuna.best_tied_trials": tied})
        else:
            tracker.delete_tag("optuna.best_tied_trials")  # a later trial broke the tie
        tracker.log_metrics({"study/best_value": best.value}, step=finished)
        summary.update(best_checkpoint_dir=best.user_attrs.get("output_dir"), rerun=rerun_command(setup, best))
        tracker.set_tags({
            "optuna.best_trial_number": best.number,
            "optuna.best_value": best.value,
            "optuna.best_run_id": best_run or "",
            **{f"optuna.best_params.{name}": value for name, value in best.params.items()},
        })
    describe_study(tracker, setup, study)
    summary.update(compute_cost(study, setup.tune.burn_in))
    fidelity = rung_fidelity(study)
    if fidelity:
        summary["fidelity"] = {str(step): value for step, value in fidelity.items()}
        tracker.log_metrics({f"study/fidelity/step_{step}": value for step, value in fidelity.items()
                             if math.isfinite(value)}, step=finished)
    tracker.log_dict(summary, "study/summary.json")
    _log_trials_table(tracker, study)
    if setup.tune.plots:
        _log_plots(tracker, study)
    if status:
        tracker.end(status)
    return summary


# The parent run's tag holding the confirmation's verdict (``ssod-tune confirm``), which its
# description repeats.
CONFIRMATION_TAG = "optuna.confirmation"


def describe_study(tracker: Tracker, setup: StudySetup, study: optuna.Study) -> None:
    """The parent run's description: what was searched, how the trials ended, the best trial
    with a link to its run and its values, and the confirmation on test when there is one
    (not when a person has rewritten the description)."""
    if not tracker.enabled or not tracker.run_id:
        return
    tune = setup.tune
    trials = study.get_trials(deepcopy=False)
    ended = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"**Optuna study `{tune.study_name}`**: {tune.direction} `{tune.metric}` over "
             + ", ".join(f"`{name}`" for name in tune.space) + f"; {len(trials)} trials: "
             + ", ".join(f"{count} {state.name.lower()}" for state, count in ended.items()) + "."]
    best = best_trial(study)
    if best is not None:
        run_id = trial_run_id(setup, best.number)
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        link = f" ([its run]({run_route(experiment_id, run_id)}))" if run_id else ""
        values = ", ".join(f"`{name}={value:.4g}`" if isinstance(value, float) else f"`{name}={value}`"
                           for name, value in best.params.items())
        lines += ["", f"Best: trial {best.number}{link}, `{tune.metric}` {best.value:.4f}, with {values}."]
    confirmation = tracker.current_tag(CONFIRMATION_TAG)
    if confirmation:
        lines += ["", confirmation]
    tracker.describe("\n".join(lines), only_if_ours=True)


def rerun_command(setup: StudySetup, trial: FrozenTrial) -> str:
    """A command that trains ``trial``'s configuration again, in a new run folder."""
    from shlex import join

    from ssod.tuning.burn_in import continue_overrides
    from ssod.tuning.space import to_overrides

    fixed = [o for o in setup.fixed_overrides if not o.startswith("train.init_from=")]
    return join(["ssod-train", *fixed, *continue_overrides(setup), *to_overrides(trial.params)])


def compute_cost(study: optuna.Study, burn_in: int) -> dict:
    """Training iterations the study spent (the shared burn-in once, each trial up to its last
    report) against the same trials each trained in full from the start, without a shared
    burn-in or pruning; a trial's full length is the longest any trial reached."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    reached = [max(t.intermediate_values, default=0) for t in finished]
    if not reached or not max(reached):
        return {}
    spent = burn_in + sum(reached)
    full = len(finished) * (burn_in + max(reached))
    return {"iterations_spent": spent, "iterations_if_full": full, "cost_ratio": spent / full}


def rung_fidelity(study: optuna.Study) -> dict[int, float]:
    """Per reported step, Spearman's rank correlation between the completed trials' value
    there and their final value (how well an early look, where a pruner decides, predicts
    the end); NaN with fewer than 3 trials at a step or no spread."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)]
    steps = sorted({step for t in complete for step in t.intermediate_values})
    result = {}
    for step in steps:
        pairs = [(t.intermediate_values[step], t.value) for t in complete if step in t.intermediate_values]
        result[step] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else math.nan
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN without spread."""
    import numpy as np

    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="mergesort")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):  # ties: the mean of their ranks
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    x, y = ranks(a), ranks(b)
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)]
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: t.value)


# The trial attributes worth a column of trials.csv (the others are bookkeeping).
TABLE_ATTRS = {
    "user_attrs": ("mlflow_run_id", "output_dir", "resumed_from_step", "fail_reason", INTERRUPTED_ATTR, SURPLUS_ATTR,
                   ENQUEUED_ATTR),
    "system_attrs": ("failed_trial", "retry_history", INTERRUPTED_TRIALS),
}


def _log_trials_table(tracker: Tracker, study: optuna.Study) -> None:
    try:
        table = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", *TABLE_ATTRS))
    except ImportError:
        return  # pandas is absent
    wanted = {f"{kind}_{name}" for kind, names in TABLE_ATTRS.items() for name in names}
    table = table[[column for column in table.columns if not column.startswith(tuple(TABLE_ATTRS)) or column in wanted]]
    # A study with metric names makes the objective's column "value_<metric>": keep "value".
    table = table.rename(columns={f"value_{name}": "value" for name in (study.metric_names or [])[:1]})
    path = Path(tempfile.mkdtemp(prefix="ssod-tune-")) / "trials.csv"
    table.to_csv(path, index=False)
    tracker.log_artifact(path, "study")


PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def _log_plots(tracker: Tracker, study: optuna.Study) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts under ``plots/``; a plot that cannot be
    drawn yet (e.g. importances with fewer than two finished trials) is skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots
    except ImportError:
        log.warning("matplotlib is missing: no plots (pip install 'ssod[tune]')")
        return []
    directory = Path(tempfile.mkdtemp(prefix="ssod-tune-plots-"))
    written = []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental, and "no complete trials yet"
                axes = getattr(plots, function)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            figure.savefig(directory / f"{name}.png", dpi=90, bbox_inches="tight")
            plt.close(figure)
            written.append(name)
        except Exception as error:  # noqa: BLE001 - a missing plot must not fail a report
            log.info("plot %s skipped: %s", name, error)
    for name in written:
        tracker.log_artifact(directory / f"{name}.png", "plots")
    return written
