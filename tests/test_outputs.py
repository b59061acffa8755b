"""Where a run's files go and what it is called (``ssod.outputs``), without training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssod.checkpoint import CheckpointError, save_checkpoint
from ssod.config import compose
from ssod.outputs import HydraJob, place_run, point_latest, run_name, short_params, write_hydra_files


def _job(tmp_path: Path, *overrides: str, multirun: bool = False) -> HydraJob:
    return HydraJob(multirun=multirun, output_dir=tmp_path / "outputs/multirun/t/3", overrides=overrides,
                    hydra_yaml="hydra:\n  run:\n    dir: .\n")


def _finished(folder: Path, cfg) -> None:
    """What a run leaves in its folder: its resolved config and a checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_checkpoint(folder / "checkpoints", 2, {"step": 2, "weights": torch.zeros(2)})


def test_every_new_run_gets_a_folder_of_its_own_and_latest_points_at_the_newest_started(tmp_path: Path):
    cfg = compose(["method=supervised"])
    first, second = place_run(cfg, tmp_path, None), place_run(cfg, tmp_path, None)
    group = tmp_path / "outputs" / "supervised-synthetic"
    assert first.parent == second.parent == group and first != second
    assert first.is_dir() and second.is_dir()
    assert second.name == f"{first.name}-2" or second.name > first.name  # two in the same second: numbered
    assert not (group / "latest").exists()  # placed is not started: a start that fails moves nothing
    point_latest(first)
    point_latest(second)
    assert (group / "latest").resolve() == second.resolve()
    # Not for a folder given by the user, nor for a multirun's job.
    point_latest(tmp_path / "mine" / "run")
    point_latest(tmp_path / "outputs" / "multirun" / "2026-01-01_00-00-00")
    assert not (tmp_path / "mine" / "latest").exists() and not (tmp_path / "outputs" / "multirun" / "latest").exists()


def test_runs_of_one_second_are_ordered_by_their_number(tmp_path: Path):
    group = tmp_path / "outputs" / "polish_teacher-synthetic"
    cfg = compose([])
    for name in ("2026-01-01_00-00-00", "2026-01-01_00-00-00-2", "2026-01-01_00-00-00-10", "2026-01-01_00-00-00-9"):
        _finished(group / name, cfg)
    assert place_run(compose(["train.resume=auto"]), tmp_path, None).name == "2026-01-01_00-00-00-10"


def test_resume_auto_continues_a_run_of_the_layout_before_folders_of_their_own(tmp_path: Path):
    group = tmp_path / "outputs" / "polish_teacher-synthetic"
    save_checkpoint(group / "checkpoints", 2, {"step": 2, "weights": torch.zeros(2)})
    assert place_run(compose(["train.resume=auto"]), tmp_path, None) == group


def test_a_password_in_the_config_does_not_stop_resume_auto_from_matching(tmp_path: Path):
    group = tmp_path / "outputs" / "polish_teacher-synthetic"
    secret = ["data.train_json=http://user:secret@host/train.json"]
    folder = group / "2026-01-01_00-00-00"
    folder.mkdir(parents=True)
    saved = OmegaConf.to_yaml(compose(secret), resolve=True).replace("user:secret@", "user:***@")  # as written
    (folder / "config.yaml").write_text(saved)
    save_checkpoint(folder / "checkpoints", 2, {"step": 2, "weights": torch.zeros(2)})
    assert place_run(compose([*secret, "train.resume=auto"]), tmp_path, None) == folder


def test_a_given_output_dir_is_used_as_it_is(tmp_path: Path):
    assert place_run(compose(["train.output_dir=runs/mine"]), tmp_path, None) == tmp_path / "runs/mine"
    assert place_run(compose([f"train.output_dir={tmp_path / 'abs'}"]), tmp_path, None) == tmp_path / "abs"
    assert not (tmp_path / "outputs").exists()


def test_resume_auto_continues_the_newest_run_of_the_same_config(tmp_path: Path, caplog):
    group = tmp_path / "outputs" / "polish_teacher-synthetic"
    cfg = compose([])
    _finished(group / "2026-01-01_00-00-00", cfg)
    _finished(group / "2026-01-02_00-00-00", cfg)
    _finished(group / "2026-01-03_00-00-00", compose(["train.lr=0.5"]))  # newer, but another run
    (group / "2026-01-04_00-00-00").mkdir()  # started, never checkpointed
    # What a resume may change (a longer schedule) keeps it the same run.
    caplog.set_level(logging.INFO, logger="ssod.outputs")
    resumed = place_run(compose(["train.resume=auto", "train.iterations=5000"]), tmp_path, None)
    assert resumed == group / "2026-01-02_00-00-00"
    assert "2026-01-03_00-00-00 is a run of another config (train.lr)" in caplog.text


def test_resume_auto_without_an_earlier_run_starts_a_new_folder(tmp_path: Path):
    group = tmp_path / "outputs" / "polish_teacher-synthetic"
    _finished(group / "2026-01-01_00-00-00", compose(["train.seed=1"]))
    folder = place_run(compose(["train.resume=auto"]), tmp_path, None)
    assert folder.parent == group and folder.name != "2026-01-01_00-00-00" and folder.is_dir()


def test_resume_from_a_checkpoint_continues_in_its_run_folder(tmp_path: Path):
    folder = tmp_path / "outputs" / "polish_teacher-synthetic" / "2026-01-01_00-00-00"
    _finished(folder, compose([]))
    checkpoint = folder / "checkpoints" / "step-00000002.pt"
    assert place_run(compose([f"train.resume={checkpoint}"]), tmp_path, None) == folder
    assert place_run(compose([f"train.resume={folder}"]), tmp_path, None) == folder
    # Through `latest`: the folder it points at now, not the link (it moves with the next run).
    (folder.parent / "latest").symlink_to(folder.name)
    latest = folder.parent / "latest" / "checkpoints" / "step-00000002.pt"
    assert place_run(compose([f"train.resume={latest}"]), tmp_path, None) == folder
    # A checkpoint outside a run's folder (copied somewhere): a new folder, not its directory.
    loose = tmp_path / "step-00000002.pt"
    loose.write_bytes(checkpoint.read_bytes())
    assert place_run(compose([f"train.resume={loose}"]), tmp_path, None).parent.name == "polish_teacher-synthetic"
    with pytest.raises(CheckpointError, match="train.resume=nowhere.pt: no such checkpoint file"):
        place_run(compose(["train.resume=nowhere.pt"]), tmp_path, None)


def test_a_multirun_job_uses_hydras_job_folder(tmp_path: Path):
    job = _job(tmp_path, "train.seed=3", multirun=True)
    assert place_run(compose(["train.seed=3"]), tmp_path, job) == job.output_dir
    assert job.output_dir.is_dir()


def test_the_run_name_is_short_and_says_what_differs(tmp_path: Path):
    cfg = compose(["method=soft_teacher", "data.percent=5", "data.fold=2", "train.seed=7", "method.unsup_weight=1.5",
                   "tracking.uri=http://user:secret@host:5000"])
    job = _job(tmp_path, "method=soft_teacher", "data.percent=5", "data.fold=2", "train.seed=7",
               "method.unsup_weight=1.5", "tracking.uri=http://user:secret@host:5000", "train.resume=auto",
               "train.eval_every=10", "data.num_workers=0", "train.init_from=outputs/burn-in/checkpoints/step-400.pt")
    # What it trains, each override by its last key; where it runs and how it reports left out.
    assert run_name(cfg, job) == "soft_teacher 5% fold2 seed7 unsup_weight=1.5 init_from=step-400.pt"
    assert run_name(cfg, None) == "soft_teacher 5% fold2 seed7"
    assert run_name(compose(["train.seed=3"]), None) == "polish_teacher 10% seed3"
    assert run_name(compose(["data=coco", "data.percent=1"]), None) == "polish_teacher coco 1% seed0"
    # A labeled set given as a file has no fraction; a name given is used as it is.
    given = compose(["data.unlabeled_json=u.json", "train.run_name=mine"])
    assert run_name(given, job) == "mine"
    assert run_name(compose(["data.unlabeled_json=u.json"]), None) == "polish_teacher seed0"
    # MLflow's limit on a name's length.
    long = _job(tmp_path, *[f"+tracking.tags.k{i}=v" for i in range(3)], *[f"method.unsup_weight={i}.0" for i in range(60)])
    assert len(run_name(cfg, long)) == 250 and run_name(cfg, long).endswith("...")


def test_the_short_params_name_method_percent_and_seed():
    assert short_params(compose(["method=soft_teacher", "data.percent=5", "train.seed=7"])) == {
        "method": "soft_teacher", "percent": "5", "seed": "7"}
    assert short_params(compose(["data.unlabeled_json=u.json"]))["percent"] == "given"


def test_hydras_record_of_the_job_is_written_masked(tmp_path: Path):
    cfg = compose(["tracking.uri=http://user:secret@host:5000"])
    job = _job(tmp_path, "tracking.uri=http://user:secret@host:5000")
    write_hydra_files(tmp_path / "run", cfg, job)
    written = {path.name: path.read_text() for path in (tmp_path / "run" / ".hydra").iterdir()}
    assert set(written) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "secret" not in "".join(written.values())
    assert "http://user:***@host:5000" in written["overrides.yaml"]
    assert OmegaConf.create(written["config.yaml"]).train.iterations == cfg.train.iterations
    # A resume keeps the record of the command that started the run.
    write_hydra_files(tmp_path / "run", compose(["train.iterations=5"]), _job(tmp_path, "train.iterations=5"))
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text() == written["overrides.yaml"]
