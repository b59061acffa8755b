"""Study reports (``ssod.tuning.report``): the best trial, ties, nested MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ssod.tune import main, prepare
from tuning_project import STUDY, Project, check_trial_runs


def test_the_report_names_a_tie_for_best_and_drops_it_once_broken(project: Project) -> None:
    from mlflow.tracking import MlflowClient

    from ssod.tuning.report import parent_run, write_report

    setup = prepare(project.overrides)
    parent = parent_run(setup)
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(0.5, 4.0)
    for value in (0.5, 0.5):
        study.add_trial(optuna.trial.create_trial(params={"method.unsup_weight": value * 2},
                                                  distributions={"method.unsup_weight": distribution}, value=value))
    assert write_report(setup, study, parent)["best_tied_trials"] == 2
    assert MlflowClient(project.mlflow_uri).get_run(parent).data.tags["optuna.best_tied_trials"] == "2"
    study.add_trial(optuna.trial.create_trial(params={"method.unsup_weight": 3.0},
                                              distributions={"method.unsup_weight": distribution}, value=0.9))
    assert "best_tied_trials" not in write_report(setup, study, parent)
    assert "optuna.best_tied_trials" not in MlflowClient(project.mlflow_uri).get_run(parent).data.tags


# --------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_sqlite_study_completes_with_nested_mlflow_runs(project: Project, caplog) -> None:
    # Left by another study of the same name (another storage, or deleted and made again):
    # trial 0 must not resume it with its own parameters.
    from ssod.checkpoint import save_checkpoint

    foreign = save_checkpoint(project.root / "outputs/tune" / STUDY / "trial-0000" / "checkpoints", 2, {"step": 2})
    caplog.set_level("INFO")
    assert main(project.overrides) == 0
    assert (project.root / "optuna.db").is_file()
    study = project.study(f"sqlite:///{project.root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    check_trial_runs(project, study)
    parent, runs = project.runs()
    assert len(runs) == 3 and parent.info.status == "FINISHED"
    # The console names the study's run and where to see it, in MLflow's model-training view.
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the study's MLflow run")]
    assert said.startswith(f"the study's MLflow run {parent.info.run_id}; see it: ")
    link = said.split("see it: ", 1)[1]
    assert f"runs/{parent.info.run_id}" in link and "workflowType=machine_learning" in link
    best = max(study.trials, key=lambda t: t.value)
    best_run = {r.data.tags["optuna.trial_number"]: r.info.run_id for r in runs}[str(best.number)]
    assert parent.data.tags["optuna.best_run_id"] == best_run
    assert parent.data.tags["optuna.best_params.method.rf_cls_thr"] == str(best.params["method.rf_cls_thr"])
    artifacts = set(project.artifacts(parent.info.run_id))
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert f"plots/{plot}.png" in artifacts
    tied = sum(t.value == best.value for t in study.trials)
    assert parent.data.tags.get("optuna.best_tied_trials") == (str(tied) if tied > 1 else None)
    from mlflow.tracking import MlflowClient

    table = Path(MlflowClient(project.mlflow_uri).download_artifacts(parent.info.run_id, "study/trials.csv"))
    header = table.read_text().splitlines()[0].split(",")
    assert {"number", "state", "value", "user_attrs_mlflow_run_id", "params_method.rf_cls_thr"} <= set(header)
    assert not [column for column in header if column.startswith("system_attrs_tpe")], header
    # Only the best trial keeps its checkpoints (and the foreign one is untouched).
    kept = set((project.root / "outputs/tune" / STUDY).glob("trial-*/checkpoints/*.pt")) - {foreign}
    assert kept and {path.parent.parent for path in kept} == {Path(best.user_attrs["output_dir"])}
    summary = json.loads(Path(MlflowClient(project.mlflow_uri).download_artifacts(
        parent.info.run_id, "study/summary.json")).read_text())
    assert summary["best_checkpoint_dir"] == best.user_attrs["output_dir"]
    assert summary["rerun"].startswith("ssod-train experiment=synthetic") and "method.rf_cls_thr=" in summary["rerun"]
    assert set(summary["fidelity"]) == {str(step) for step in best.intermediate_values}
    # No burn-in and no pruning in this study: the cost of full trials.
    assert summary["cost_ratio"] == 1.0 and summary["iterations_spent"] == 3 * max(best.intermediate_values)
    first = study.trials[0]
    assert "resumed_from_step" not in first.user_attrs
    assert Path(first.user_attrs["output_dir"]).name.startswith("trial-0000-")
    assert study.metric_names == ["val/teacher/bbox_AP"]  # optuna-dashboard's axis label

    # ``report`` only reads: the study tuned last when none is named, a clear refusal for one
    # that does not exist, and never a new study, storage or MLflow run.
    unnamed = [o for o in project.overrides if not o.startswith("tune=")]
    assert main(["report", *unnamed]) == 0
    assert main(["report", *project.overrides, "tune.study_name=nope"]) == 2
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{project.root / 'optuna.db'}")] == [STUDY]
    again, rerun = project.runs()
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED" and len(rerun) == 3
    elsewhere = project.root / "elsewhere"
    elsewhere.mkdir()
    assert main(["report", *unnamed, f"--storage=sqlite:///{elsewhere / 'optuna.db'}"]) == 2
    assert not (elsewhere / "optuna.db").exists()


def test_spearman_rank_correlation_with_ties_and_without_spread() -> None:
    import math

    from ssod.tuning.report import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's value
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_confirm_trains_best_default_and_paper_on_other_seeds_and_bootstraps_their_test_differences(
        project: Project, tmp_path: Path) -> None:
    """A real tiny study with a shared burn-in, then ``ssod-tune confirm``: every configuration
    on every confirmation seed, each continuing its seed's own burn-in, evaluated on a test split."""
    tiny = [*project.overrides, "tune.n_trials=3", "tune.burn_in=2", "train.iterations=4", "+tune.enqueue.default={}",
            "+tune.enqueue.paper={method.unsup_weight: 3.0}", "tune.confirm_seeds=[1,2]",
            "tune.confirm_overrides=['data.synthetic.num_test=4']"]
    assert main(tiny) == 0
    out = tmp_path / "results"
    assert main(["confirm", *tiny, "--out-dir", str(out), "--replicates", "20"]) == 0
    document = json.loads((out / "tuning_benchmark.json").read_text())
    assert sorted((r["config"], r["seed"]) for r in document["runs"]) == [
        (c, s) for c in ("best", "default", "paper") for s in (1, 2)]
    assert all(0 <= r["test_teacher_AP"] <= 1 or r["test_teacher_AP"] != r["test_teacher_AP"] for r in document["runs"])
    paper = [r for r in document["runs"] if r["config"] == "paper"]
    assert all(r["params"]["method.unsup_weight"] == 3.0 for r in paper)
    assert [s["comparison"] for s in document["summary"]] == ["best-default", "best-paper", "default-paper"]
    for entry in document["summary"]:
        assert entry["seeds"] == 2 and entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    assert "| best-default | 2 |" in (out / "tuning_benchmark.md").read_text()
    # Each seed continued its own burn-in, made once.
    burn_ins = sorted((project.root / "outputs/tune/burn-ins").glob("burn-in-2-*/checkpoints/step-00000002.pt"))
    assert len(burn_ins) == 3  # the study's and one per confirmation seed
    parent, trial_runs = project.runs()
    assert "confirm/best-default/mean" in parent.data.metrics
    # The description: what was searched, the best trial with a link to its run, the confirmation.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Optuna study `{STUDY}`**: maximize `val/teacher/bbox_AP` over `")
    (best_run,) = [r for r in trial_runs if r.data.tags["optuna.trial_number"] == str(document["best_trial"])]
    assert (f"Best: trial {document['best_trial']} ([its run](#/experiments/{parent.info.experiment_id}/runs/"
            f"{best_run.info.run_id}?workflowType=machine_learning)), `val/teacher/bbox_AP` ") in note
    assert "\n\nConfirmed on the held-out test split (seeds [1, 2], best = trial" in note
    # Run again: everything is read back, nothing trained anew.
    made = {r["config"]: r["mlflow_run_id"] for r in document["runs"]}
    assert main(["confirm", *tiny, "--out-dir", str(out), "--replicates", "20"]) == 0
    again = json.loads((out / "tuning_benchmark.json").read_text())
    assert {r["config"]: r["mlflow_run_id"] for r in again["runs"]} == made
