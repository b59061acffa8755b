"""The training loop in 2 CPU processes (torchrun, gloo): both train, one MLflow run, one evaluation.

``accelerate launch --num_processes 2 --cpu`` starts a single process on one machine (its
CPU multi-process mode needs MPI), so the test launches with ``torchrun``, which accelerate
picks up as a multi-CPU (gloo) run.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from ssod.checkpoint import list_checkpoints, load_checkpoint

# A driver around ``ssod.train.main`` that records, per rank, the images of every step and
# the student's weights at every checkpoint, and makes rank 1 alone see a NaN loss once
# (it patches ``ssod.step``, where each iteration computes its losses and saves). At step 1
# both ranks meet the same unreadable image, and rank 1 another one.
DRIVER = '''
import json, math, os, sys
import torch
import ssod.methods.base as base
import ssod.step as step
import ssod.train as train

rank = int(os.environ["RANK"])
out = os.environ["RANK_RECORDS"]
nan_step = int(os.environ["NAN_STEP_ON_RANK_1"])
raise_step = int(os.environ.get("RAISE_ON_RANK_0", "0"))
real_losses, real_save_state = base.Method.compute_losses, step.save_state
calls = 0

def compute_losses(self, student, teacher, labeled, unlabeled):
    global calls
    calls += 1
    if rank == 0 and calls == raise_step:
        raise RuntimeError("rank 0 fails alone")
    result = real_losses(self, student, teacher, labeled, unlabeled)
    if rank == 1 and calls == nan_step:
        result.losses = {name: value * math.nan for name, value in result.losses.items()}
    with open(os.path.join(out, f"rank{rank}-steps.jsonl"), "a") as handle:
        record = {"step": calls, "labeled": [int(item[1]["image_id"]) for item in labeled],
                  "unlabeled": [int(item[2]["image_id"]) for item in unlabeled]}
        handle.write(json.dumps(record) + "\\n")
    return result

def save_state(accelerator, directory, state, student, teacher, *rest):
    weights = accelerator.unwrap_model(student).state_dict()
    digest = sum(float(value.double().abs().sum()) for value in weights.values())
    with open(os.path.join(out, f"rank{rank}-checkpoints.jsonl"), "a") as handle:
        handle.write(json.dumps({"step": state.step, "weights": digest}) + "\\n")
    return real_save_state(accelerator, directory, state, student, teacher, *rest)

real_note = step.RunState.note_bad_files

def note_bad_files(self, metas):
    real_note(self, metas)
    if self.step == 0:
        for name in ["shared.jpg: unreadable"] + (["rank1-only.jpg: unreadable"] if rank == 1 else []):
            self.bad_files.append(name)

base.Method.compute_losses, step.save_state = compute_losses, save_state
step.RunState.note_bad_files = note_bad_files
train.main()
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_together_and_log_once(tiny_args, trainer, mlflow_store, tmp_path: Path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    records = tmp_path / "records"
    records.mkdir()
    trainer.env.update({"RANK_RECORDS": str(records), "NAN_STEP_ON_RANK_1": "2"})
    launcher = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    # The default output folder: the first process names it (after the time), the other follows.
    args = [*(arg for arg in tiny_args("polish_teacher") if not arg.startswith("train.output_dir=")),
            "train.iterations=4", "train.eval_every=2", "train.ckpt_every=2",
            "data.val_max_images=4", "data.max_bad_image_fraction=0.2"]
    status, output = trainer.run(args, script=driver, launcher=launcher, timeout=400)
    assert status == 0, output[-3000:]
    [folder] = [p for p in (tmp_path / "outputs" / "polish_teacher-synthetic").iterdir() if not p.is_symlink()]

    # Both processes trained every step, each on its own shard of the labeled and unlabeled data.
    steps = {rank: _records(records / f"rank{rank}-steps.jsonl") for rank in (0, 1)}
    for rank in (0, 1):
        assert [record["step"] for record in steps[rank]] == [1, 2, 3, 4]
    for kind in ("labeled", "unlabeled"):
        assert steps[0][0][kind] != steps[1][0][kind], f"both ranks drew the same {kind} images"
    # Data parallel: the weights are the same on both processes at every checkpoint, and move.
    saved = {rank: _records(records / f"rank{rank}-checkpoints.jsonl") for rank in (0, 1)}
    assert [record["step"] for record in saved[0]] == [record["step"] for record in saved[1]] == [2, 4]
    assert [record["weights"] for record in saved[0]] == pytest.approx([record["weights"] for record in saved[1]], rel=1e-9)
    assert saved[0][0]["weights"] != pytest.approx(saved[0][1]["weights"], rel=1e-9)

    # One MLflow run (rank 1 created none); each evaluation logged once.
    run = mlflow_store.only_run()
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in ("val/teacher/bbox_AP", "val/student/bbox_AP", "val/teacher/bbox_AP50"):
        assert mlflow_store.steps(run_id, key) == [2, 4], key
    mlflow_store.assert_no_step_twice(run_id)
    # Rank 1's NaN at step 2 made both processes skip that step (rank 0's own loss was finite):
    # counted, and absent from the loss average.
    assert mlflow_store.history(run_id, "train/nonfinite_steps") == {1: [0.0], 2: [1.0], 3: [1.0], 4: [1.0]}
    assert mlflow_store.steps(run_id, "train/loss") == [1, 3, 4]
    final = load_checkpoint(list_checkpoints(folder / "checkpoints")[-1][1])
    assert (final["step"], final["ema_steps"], final["nonfinite_steps"]) == (4, 3, 1)
    # Unreadable images are counted once however many processes met them, and all of them
    # are listed and saved (not only the main process's).
    assert mlflow_store.history(run_id, "train/bad_images") == {step: [2.0] for step in (1, 2, 3, 4)}
    both = ["shared.jpg: unreadable", "rank1-only.jpg: unreadable"]
    assert mlflow_store.read_text(run_id, "bad_images.txt").splitlines() == both
    assert final["bad_files"] == both

    # The run says what it is: processes, batches per process and together, the rate, the launcher's command.
    params = run.data.params
    assert (params["dist.world_size"], params["dist.batch_labeled_per_process"], params["dist.global_batch_labeled"],
            params["dist.global_batch_unlabeled"]) == ("2", params["train.batch_labeled"],
                                                       str(2 * int(params["train.batch_labeled"])),
                                                       str(2 * int(params["train.batch_unlabeled"])))
    assert params["dist.effective_lr"] == params["train.lr"]
    assert params["dist.command"].startswith("torchrun --nproc_per_node 2 ") and str(driver) in params["dist.command"]
    note = run.data.tags["mlflow.note.content"]
    assert "2 processes: global batch" in note and f"Command: `{params['dist.command']}`" in note
    # The console shows the run once (rank 1 says only warnings, marked with its rank), and DDP does not
    # warn about a search for unused parameters (off: every parameter gets a gradient).
    assert output.count("output folder: ") == 1 and output.count("MLflow run ") == 1
    assert "find_unused_parameters" not in output


@pytest.mark.slow
def test_an_error_in_one_process_ends_the_job_instead_of_hanging_it(tiny_args, trainer, mlflow_store, tmp_path: Path):
    """Rank 0 raises in step 2 while rank 1 waits for it in the step's collectives: the job
    must end with an error (torchrun stops the other process), not hang until a timeout."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    records = tmp_path / "records"
    records.mkdir()
    trainer.env.update({"RANK_RECORDS": str(records), "NAN_STEP_ON_RANK_1": "0", "RAISE_ON_RANK_0": "2"})
    launcher = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    args = [*tiny_args("supervised"), "train.iterations=4", "train.eval_every=100", "train.ckpt_every=100",
            "data.max_bad_image_fraction=0.9"]
    status, output = trainer.run(args, script=driver, launcher=launcher, timeout=180)
    assert status != 0 and "rank 0 fails alone" in output, output[-3000:]
    assert mlflow_store.only_run().info.status == "FAILED"
