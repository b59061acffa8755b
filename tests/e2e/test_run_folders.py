"""Running the same command again, a Hydra sweep and ``train.resume=auto`` with the default
output folders: real ``ssod-train`` processes, each run in its own folder and MLflow run."""

from __future__ import annotations

from pathlib import Path

import yaml


def test_the_same_command_twice_and_a_sweep_run_side_by_side_and_resume_auto_finds_its_run(
    tiny_args, trainer, mlflow_store, tmp_path: Path
):
    args = [arg for arg in tiny_args() if not arg.startswith("train.output_dir=")] + ["train.iterations=2"]
    for _ in range(2):
        status, output = trainer.run(args)
        assert status == 0, output
    group = tmp_path / "outputs" / "supervised-synthetic"
    first, second = sorted(p for p in group.iterdir() if not p.is_symlink())
    assert (group / "latest").resolve() == second.resolve()
    for folder in (first, second):
        assert [p.name for p in (folder / "checkpoints").glob("step-*.pt")] == ["step-00000002.pt"]
        assert {"config.yaml", "console.log", "final_metrics.json"} <= {p.name for p in folder.iterdir()}
        assert yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) == args
        assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["output_dir"] == str(folder.relative_to(tmp_path))

    # A sweep: one job per seed, each in Hydra's job folder, named by what it sweeps.
    status, output = trainer.run(["-m", *args, "train.seed=0,1", "train.lr=0.02"], log_name="sweep.log")
    assert status == 0, output
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "mlflow_parent_run", "multirun.yaml"]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "step-00000002.pt").is_file()
        assert (sweep / job / ".hydra" / "hydra.yaml").is_file()
    # The sweep's jobs nest under one parent run, which ends with a table of them.
    (parent,) = [run for run in mlflow_store.runs() if run.data.tags.get("ssod.role") == "sweep"]
    jobs = [run for run in mlflow_store.runs() if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (sweep / "mlflow_parent_run").read_text().strip() == parent.info.run_id
    assert len(jobs) == 2 and parent.info.status == "FINISHED" and parent.data.tags["ssod.sweep"] == str(sweep)
    assert parent.data.params["sweep.overrides"].endswith("train.seed=0,1 train.lr=0.02")
    assert parent.data.metrics["sweep/jobs"] == 2
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Hydra multirun** in `{sweep}`") and sum(job.info.run_name in note for job in jobs) == 2

    names = sorted(run.info.run_name for run in mlflow_store.runs() if run.info.run_id != parent.info.run_id)
    # Names say what differs (the sweep's seed and learning rate); the same command twice is numbered.
    assert sum(name.startswith("supervised 10% seed0 ") for name in names) == 3, names
    assert sum(name.startswith("supervised 10% seed1 ") for name in names) == 1, names
    # (These tiny runs' many overrides make long names, cut at MLflow's limit: the sweep's
    # learning rate falls past it, so its seed-0 job is numbered too; the number is kept.)
    assert sum(name.endswith(" #2") for name in names) == 1 and len(set(names)) == 4, names
    assert all(len(name) <= 250 for name in names)  # MLflow's limit (these tiny runs have many overrides)

    # resume=auto with a longer schedule: the newest run of this config, in its folder and MLflow run.
    status, output = trainer.run([*args[:-1], "train.iterations=3", "train.resume=auto"], log_name="resume.log")
    assert status == 0, output
    assert f"train.resume=auto: continuing {second}" in output
    assert (second / "checkpoints" / "step-00000003.pt").is_file()
    assert len(mlflow_store.runs()) == 5


def test_a_sweep_that_stops_on_a_failed_job_ends_its_parent_run_failed(tiny_args, trainer, mlflow_store):
    args = [arg for arg in tiny_args() if not arg.startswith(("train.output_dir=", "train.iterations="))]
    status, output = trainer.run(["-m", *args, "train.iterations=2,-1"], log_name="sweep.log")
    assert status == 2 and "train.iterations=-1 (must be >= 1)" in output, output
    (parent,) = [run for run in mlflow_store.runs() if run.data.tags.get("ssod.role") == "sweep"]
    (job,) = [run for run in mlflow_store.runs() if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FAILED" and job.info.status == "FINISHED"
