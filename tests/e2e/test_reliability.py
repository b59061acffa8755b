"""Issue 5 at training time: bad data, NaN losses, signals, kills, full disks, unsafe checkpoints.

Every fault is made for real (broken files on disk, signals to a training process, a
checkpoint write cut half-way) and the test checks what the run did: the error it raised
and named, what it skipped and counted, the MLflow status, and the checkpoints left.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssod.inference
import ssod.methods.base
import ssod.step
from ssod import checkpoint
from ssod.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ssod.data.coco import DatasetError
from ssod.step import NonFiniteLossError
from ssod.training import run

WIDTH, HEIGHT = 96, 72


# --- broken datasets, built here ---------------------------------------------------------


def _noise(mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _box(image_id: int, bbox, category_id: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "area": abs(bbox[2] * bbox[3]), "iscrowd": 0}


def _write_json(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    for index, annotation in enumerate(annotations, start=1):
        annotation["id"] = index
    categories = [{"id": 1, "name": "blob"}, {"id": 3, "name": "spot"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def messy_dataset(tmp_path: Path) -> dict[str, Path]:
    """Six training images: RGB, CMYK JPEG, 16-bit PNG, grey, a truncated JPEG and a missing
    file; boxes partly and wholly outside the image and one of zero width. A clean val set."""
    images = tmp_path / "images"
    images.mkdir()
    _noise().save(images / "rgb.jpg", quality=95)
    _noise("CMYK").save(images / "cmyk.jpg", quality=95)
    Image.fromarray((np.arange(WIDTH * HEIGHT, dtype=np.uint16).reshape(HEIGHT, WIDTH) * 9)).save(images / "sixteen.png")
    _noise("L").save(images / "grey.png")
    _noise().save(images / "truncated.jpg", quality=95)
    raw = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    names = ["rgb.jpg", "cmyk.jpg", "sixteen.png", "grey.png", "truncated.jpg", "missing.jpg"]
    infos = [{"id": i, "file_name": name, "width": WIDTH, "height": HEIGHT} for i, name in enumerate(names, start=1)]
    annotations = [_box(i, [10 + i, 8, 30, 24], category_id=1 + 2 * (i % 2)) for i in range(1, 7)]
    annotations += [
        _box(1, [70, 50, 60, 60]),  # partly outside: clamped to the image
        _box(2, [WIDTH + 10, 5, 20, 20]),  # wholly outside: nothing left, dropped
        _box(3, [20, 20, 0, 15]),  # zero width: dropped (torchvision would assert on it)
    ]
    train_json = _write_json(tmp_path / "train.json", infos, annotations)
    val_json = _write_json(tmp_path / "val.json", infos[:4], [_box(i, [10, 8, 30, 24]) for i in range(1, 5)])
    return {"train_json": train_json, "val_json": val_json, "images": images}


def _data_overrides(files: dict[str, Path]) -> list[str]:
    return [
        "data.name=coco", "data.percent=100",
        f"data.train_json={files['train_json']}", f"data.train_images={files['images']}",
        f"data.val_json={files['val_json']}", f"data.val_images={files['images']}",
    ]


@pytest.mark.slow
def test_a_messy_dataset_trains_with_bad_images_skipped_counted_and_listed(messy_dataset, make_config, mlflow_store):
    """CMYK, 16-bit and grey images are converted, boxes clamped or dropped, and the two
    unreadable images (truncated, missing) skipped, counted and listed."""
    run(make_config(*_data_overrides(messy_dataset), "data.max_bad_image_fraction=0.5", "train.batch_labeled=2",
                    "train.iterations=3"))
    run_ = mlflow_store.only_run()
    assert run_.info.status == "FINISHED"
    run_id = run_.info.run_id
    assert mlflow_store.history(run_id, "train/bad_images")[3] == [2.0]
    assert mlflow_store.history(run_id, "train/nonfinite_steps")[3] == [0.0]
    assert all(math.isfinite(value) for values in mlflow_store.history(run_id, "train/loss").values() for value in values)
    listed = mlflow_store.read_text(run_id, "bad_images.txt").splitlines()
    assert sorted(line.split(":")[0] for line in listed) == [
        str(messy_dataset["images"] / "missing.jpg"), str(messy_dataset["images"] / "truncated.jpg")]
    # The two degenerate boxes (outside, zero width) are counted at start, not only dropped:
    # params (they do not change), not metrics.
    params = run_.data.params
    assert params["data/train/degenerate_boxes"] == "2"
    assert params["data/train/clipped_boxes"] == "1"  # the one partly outside
    assert params["data/train/boxes"] == "7" and params["data/eval/boxes"] == "4"
    assert not [name for name in run_.data.metrics if name.startswith("data/")]


def test_a_labeled_set_without_usable_boxes_is_refused_naming_the_file(messy_dataset, make_config, mlflow_store, tmp_path):
    data = json.loads(messy_dataset["train_json"].read_text())
    data["annotations"] = [a for a in data["annotations"] if a["bbox"][2] == 0]  # only the zero-width box
    empty = tmp_path / "no-boxes.json"
    empty.write_text(json.dumps(data))
    files = {**messy_dataset, "train_json": empty}
    with pytest.raises(DatasetError, match=rf"{empty}: the labeled images .* have no usable box \(1 degenerate\)"):
        run(make_config(*_data_overrides(files), "train.iterations=1"))
    assert mlflow_store.runs() == []


def test_a_fault_found_in_a_split_names_the_users_json(messy_dataset, make_config, mlflow_store, tmp_path):
    data = json.loads(messy_dataset["train_json"].read_text())
    for annotation in data["annotations"]:
        if annotation["category_id"] == 1:
            annotation["category_id"] = 2  # not in 'categories': in every split, whatever it draws
    broken = tmp_path / "user.json"
    broken.write_text(json.dumps(data))
    files = {**messy_dataset, "train_json": broken}
    overrides = [o for o in _data_overrides(files) if o != "data.percent=100"]
    with pytest.raises(DatasetError, match=rf"^{broken} \(data.train_json; found in the split made from it\): .*category ids \[2\] not in"):
        run(make_config(*overrides, "data.percent=50", "train.iterations=1"))


def test_unreadable_validation_images_are_left_out_of_the_metrics_and_counted(messy_dataset, make_config, mlflow_store):
    """Scored as all misses they would lower the AP with no sign: they are left out, and
    the run says how many images were evaluated and how many could not be read."""
    files = {**messy_dataset, "val_json": messy_dataset["train_json"]}  # truncated.jpg, missing.jpg
    result = run(make_config(*_data_overrides(files), "data.max_bad_image_fraction=0.5", "train.iterations=1"))
    run_id = mlflow_store.only_run().info.run_id
    for model in ("teacher", "student"):
        assert result[f"val/{model}/bbox_images"] == 4.0 and result[f"val/{model}/bbox_unreadable_images"] == 2.0
        assert mlflow_store.history(run_id, f"val/{model}/bbox_unreadable_images") == {1: [2.0]}


def test_too_many_bad_images_stop_the_run_with_a_clear_error(messy_dataset, make_config, mlflow_store):
    with pytest.raises(DatasetError, match=r"2 of 6 training images could not be read \(more than "
                                           r"data.max_bad_image_fraction=0.2\); first: .*(truncated|missing)\.jpg"):
        run(make_config(*_data_overrides(messy_dataset), "data.max_bad_image_fraction=0.2", "train.batch_labeled=2",
                        "train.iterations=6"))
    run_ = mlflow_store.only_run()
    assert run_.info.status == "FAILED"
    assert len(mlflow_store.read_text(run_.info.run_id, "bad_images.txt").splitlines()) == 2


def _empty_file(files):
    files["train_json"].write_text("")


def _malformed(files):
    files["train_json"].write_text('{"images": [')


def _no_images(files):
    files["train_json"].write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))


def _unknown_category(files):
    data = json.loads(files["train_json"].read_text())
    data["annotations"][0]["category_id"] = 2
    files["train_json"].write_text(json.dumps(data))


def _missing_json(files):
    files["train_json"].unlink()


def _missing_image_dir(files):
    files["images"].rename(files["images"].with_name("moved"))


def _val_categories_differ(files):
    data = json.loads(files["val_json"].read_text())
    data["categories"] = data["categories"][:1]
    files["val_json"].write_text(json.dumps(data))


@pytest.mark.parametrize(
    "breakage, file_key, message",
    [
        (_empty_file, "train_json", "not valid JSON"),
        (_malformed, "train_json", "not valid JSON"),
        (_no_images, "train_json", "the 'images' list is empty"),
        (_unknown_category, "train_json", r"annotations use category ids \[2\] not in 'categories'"),
        (_missing_json, "train_json", "annotation file not found"),
        (_missing_image_dir, "images", "image directory not found"),
        (_val_categories_differ, "val_json", "its categories differ from the labeled set's"),
    ],
)
def test_broken_files_are_clear_errors_at_start(breakage, file_key, message, messy_dataset, make_config, mlflow_store,
                                                tmp_path: Path):
    breakage(messy_dataset)
    with pytest.raises(DatasetError, match=message) as caught:
        run(make_config(*_data_overrides(messy_dataset), "train.iterations=2"))
    assert str(messy_dataset[file_key]) in str(caught.value)
    assert mlflow_store.runs() == []  # failed before any run was opened or any step taken
    assert not (tmp_path / "outputs" / "checkpoints").exists()


# --- non-finite losses ---------------------------------------------------------------------


def _poison_losses(monkeypatch, steps: dict[int, float]) -> None:
    """Make ``compute_losses`` return ``value`` losses (NaN, inf) at the given 1-based steps."""
    real = ssod.methods.base.Method.compute_losses
    calls = []

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            result.losses = {name: loss * steps[len(calls)] for name, loss in result.losses.items()}
        return result

    monkeypatch.setattr(ssod.methods.base.Method, "compute_losses", poisoned)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_counted(make_config, mlflow_store, monkeypatch, tmp_path: Path):
    _poison_losses(monkeypatch, {2: math.nan, 4: math.inf})
    run(make_config("train.iterations=5", "train.max_consecutive_nonfinite=2", "train.ckpt_every=5"))
    run_ = mlflow_store.only_run()
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED"
    assert mlflow_store.history(run_id, "train/nonfinite_steps") == {1: [0.0], 2: [1.0], 3: [1.0], 4: [2.0], 5: [2.0]}
    assert mlflow_store.history(run_id, "train/skipped_steps_interval") == {1: [0.0], 2: [1.0], 3: [0.0], 4: [1.0], 5: [0.0]}
    assert mlflow_store.steps(run_id, "train/loss") == [1, 3, 5]  # skipped steps add nothing to the averages
    final = load_checkpoint(tmp_path / "outputs" / "checkpoints" / "step-00000005.pt")
    assert (final["step"], final["nonfinite_steps"], final["consecutive_nonfinite"]) == (5, 2, 0)
    assert final["ema_steps"] == 3 and final["scheduler"]["last_epoch"] == 3  # teacher and schedule did not move
    assert all(torch.isfinite(value).all() for value in final["student"].values())


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run_with_a_checkpoint(make_config, mlflow_store, monkeypatch,
                                                                     tmp_path: Path):
    _poison_losses(monkeypatch, {3: math.nan, 4: math.nan, 5: math.nan, 6: math.nan})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps with a non-finite loss at step 5; "
                                                 r"checkpoint saved in .*checkpoints"):
        run(make_config("train.iterations=10", "train.max_consecutive_nonfinite=3"))
    assert mlflow_store.only_run().info.status == "FAILED"
    (step, path), = list_checkpoints(tmp_path / "outputs" / "checkpoints")
    saved = load_checkpoint(path)
    assert (step, saved["step"], saved["nonfinite_steps"], saved["consecutive_nonfinite"], saved["ema_steps"]) == (4, 4, 3, 3, 2)
    assert all(torch.isfinite(value).all() for value in saved["student"].values())


# --- signals and kills (real training processes) -------------------------------------------


def _wait_for(condition, process, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended (status {process.returncode}) before {what}:\n"
                                 + process.log_path.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("whole_group,stop", [(False, signal.SIGTERM), (True, signal.SIGTERM), (False, signal.SIGINT)],
                         ids=["main-process", "process-group", "ctrl-c"])
def test_sigterm_saves_a_checkpoint_and_ends_the_run_killed(tiny_args, trainer, mlflow_store, tmp_path: Path, whole_group,
                                                            stop):
    """SIGTERM to the trainer, or to its whole process group as a scheduler sends it (then
    with a DataLoader worker, which must leave the stop to the main process); Ctrl-C alike,
    with the shell's status for it."""
    checkpoints = tmp_path / "outputs" / "checkpoints"
    workers = ["data.num_workers=1"] if whole_group else []
    process = trainer.start([*tiny_args(), "train.iterations=100000", "train.ckpt_every=2", "train.keep_checkpoints=5", *workers])
    _wait_for(lambda: (checkpoints / "step-00000002.pt").exists(), process, what="the first checkpoint")
    if whole_group:
        os.killpg(process.pid, stop)
    else:
        process.send_signal(stop)
    # Exit status 128 + the signal (143, 130): a scheduler must not read a stopped run as a success.
    assert process.wait(timeout=120) == 128 + stop, process.log_path.read_text()[-3000:]
    output = process.log_path.read_text()
    steps = [step for step, _ in list_checkpoints(checkpoints)]
    assert steps[-1] > 2 and f"stop requested: checkpoint saved at step {steps[-1]}" in output
    assert load_checkpoint(checkpoints / f"step-{steps[-1]:08d}.pt")["step"] == steps[-1]
    run_ = mlflow_store.only_run()
    assert run_.info.status == "KILLED"
    assert max(mlflow_store.steps(run_.info.run_id, "train/loss")) == steps[-1]


def test_ctrl_c_saves_a_checkpoint_and_ends_the_run_killed(make_config, mlflow_store, monkeypatch, tmp_path: Path):
    """A real SIGINT to this process during step 2 (in-process, so ``run`` returns normally)."""
    real = ssod.methods.base.Method.compute_losses
    calls = []

    def interrupted_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssod.methods.base.Method, "compute_losses", interrupted_at_step_2)
    handler = signal.getsignal(signal.SIGINT)
    result = run(make_config("train.iterations=100", "train.log_every=5"))
    assert result.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handlers are removed again
    assert len(calls) == 2
    (step, _), = list_checkpoints(tmp_path / "outputs" / "checkpoints")
    assert step == 2
    stopped = mlflow_store.only_run()
    assert stopped.info.status == "KILLED"
    # The interval the stop cut short (steps 1-2 of 5) is logged, not lost: a resume starts after it.
    assert mlflow_store.steps(stopped.info.run_id, "train/loss") == [2]


def _ctrl_c_in_evaluation(monkeypatch, presses: int) -> list:
    """Press Ctrl-C ``presses`` times (real SIGINTs) while the first evaluation's first batch
    is being converted; returns the list of batches the evaluations converted."""
    real = ssod.inference.detections_to_host
    batches = []

    def convert(outputs):
        batches.append(len(outputs))
        if len(batches) == 1:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(outputs)

    monkeypatch.setattr(ssod.inference, "detections_to_host", convert)
    return batches


def test_ctrl_c_during_an_evaluation_cuts_it_short_and_checkpoints(make_config, mlflow_store, monkeypatch, tmp_path, caplog):
    batches = _ctrl_c_in_evaluation(monkeypatch, presses=1)
    result = run(make_config("train.iterations=6", "train.eval_every=2", "data.val_max_images=8"))
    assert result.status == "KILLED"
    assert batches == [4]  # of the teacher's two batches of 4, the second never ran; nor the student's
    assert "SIGINT received: stopping after the evaluation" in caplog.text
    assert "the evaluation at step 2 was cut short by the stop request: not logged" in caplog.text
    (step, _), = list_checkpoints(tmp_path / "outputs" / "checkpoints")
    assert step == 2
    stopped = mlflow_store.only_run()
    assert stopped.info.status == "KILLED"
    assert mlflow_store.steps(stopped.info.run_id, "val/teacher/bbox_AP") == []  # no metric of half a set


def test_a_second_ctrl_c_during_an_evaluation_stops_at_once_and_still_checkpoints(make_config, mlflow_store,
                                                                                  monkeypatch, tmp_path):
    batches = _ctrl_c_in_evaluation(monkeypatch, presses=2)
    with pytest.raises(KeyboardInterrupt):
        run(make_config("train.iterations=6", "train.eval_every=2", "data.val_max_images=8"))
    assert batches == [4]
    (step, _), = list_checkpoints(tmp_path / "outputs" / "checkpoints")
    assert step == 2  # the weights were whole (between steps): saved
    assert mlflow_store.only_run().info.status == "KILLED"


def test_a_stop_request_after_the_last_step_reaches_the_handler_that_was_there_before(make_config, mlflow_store):
    """SIGTERM during the final evaluation: the run has nothing left to stop and finishes,
    but a tuning worker running trials in this process must still hear it and stop."""
    heard = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        result = run(make_config("train.iterations=2", "train.eval_every=2"),
                     on_eval=lambda step, metrics: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.status == "FINISHED" and mlflow_store.only_run().info.status == "FINISHED"
    assert heard == [signal.SIGTERM]


def test_a_late_ctrl_c_does_not_raise_over_a_finished_run(make_config, mlflow_store):
    """With Python's own SIGINT handler before the run, a Ctrl-C during the final
    evaluation must not turn the finished run into a KeyboardInterrupt. (Python's handler is
    set here: a shell's background job, nohup among them, starts with SIGINT ignored.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run(make_config("train.iterations=2", "train.eval_every=2"),
                     on_eval=lambda step, metrics: os.kill(os.getpid(), signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.status == "FINISHED" and mlflow_store.only_run().info.status == "FINISHED"


# A driver that trains as ``python -m ssod.train`` would, except that the checkpoint of step
# HANG_AT_STEP is written half-way and then hangs, waiting for the test's SIGKILL.
HANGING_WRITER = '''
import io, os, time
import torch
import ssod.train

hang_step, marker = int(os.environ["HANG_AT_STEP"]), os.environ["WRITING_MARKER"]
real_save = torch.save

def save(state, handle, *args, **kwargs):
    if isinstance(state, dict) and state.get("step") == hang_step:
        buffer = io.BytesIO()
        real_save(state, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        handle.flush()
        os.fsync(handle.fileno())
        with open(marker, "w") as out:
            out.write(handle.name)
        time.sleep(600)
    return real_save(state, handle, *args, **kwargs)

torch.save = save
ssod.train.main()
'''


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_ends_like_an_uninterrupted_run(
    tiny_args, trainer, make_config, mlflow_store, tmp_path: Path
):
    """Killed while writing checkpoint 4 (keep 1): checkpoint 3 survives, the resume from it
    logs no step twice, and the final weights equal an uninterrupted run's exactly (CPU)."""
    driver, marker = tmp_path / "driver.py", tmp_path / "writing"
    driver.write_text(HANGING_WRITER)
    trainer.env.update({"HANG_AT_STEP": "4", "WRITING_MARKER": str(marker)})
    schedule = ["train.iterations=6", "train.ckpt_every=2", "train.keep_checkpoints=1", "train.eval_every=3",
                "data.val_max_images=4"]
    process = trainer.start([*tiny_args(), *schedule], script=driver)
    _wait_for(marker.exists, process, what="the write of checkpoint 4")
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    checkpoints = tmp_path / "outputs" / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == checkpoints and partial.name.startswith(".step-00000004.pt.tmp-") and partial.stat().st_size > 0
    # The old one is kept until a new one is complete: step 3's, saved with the evaluation
    # there (a new best, checkpoints/best.pt), which replaced step 2's (keep 1).
    assert [step for step, _ in list_checkpoints(checkpoints)] == [3]
    killed = mlflow_store.only_run()
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to close it
    assert mlflow_store.steps(killed.info.run_id, "train/loss") == [1, 2, 3, 4]

    run(make_config(*schedule, "train.resume=auto"))
    run_ = mlflow_store.only_run()
    assert run_.info.run_id == killed.info.run_id and run_.info.status == "FINISHED"
    assert mlflow_store.steps(run_.info.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert mlflow_store.steps(run_.info.run_id, "val/teacher/bbox_AP") == [3, 6]
    mlflow_store.assert_no_step_twice(run_.info.run_id)
    assert not partial.exists() and [step for step, _ in list_checkpoints(checkpoints)] == [6]

    run(make_config(*schedule, f"train.output_dir={tmp_path / 'straight'}", "tracking.experiment=straight"))
    resumed = load_checkpoint(checkpoints / "step-00000006.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000006.pt")
    for part in ("student", "teacher"):
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name} differs after the resume"
    # And the same logged numbers, bit for bit: the killed process's steps 3-4 (kept, not
    # logged again) and the resumed process's 5-6 are the straight run's.
    # Timings and the system monitor are the only numbers that may differ.
    (straight_run,) = mlflow_store.runs("straight")
    keys = [key for key in straight_run.data.metrics
            if not key.startswith("system/") and not key.endswith(("sec_per_iter", "seconds"))]
    assert {"train/loss", "train/lr", "val/teacher/bbox_AP", "val/student/bbox_AP"} <= set(keys)
    for key in keys:
        assert mlflow_store.history(run_.info.run_id, key) == mlflow_store.history(straight_run.info.run_id, key), key


# --- checkpoints: full disk, unsafe files --------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(
    make_config, mlflow_store, monkeypatch, tmp_path: Path
):
    real_save = checkpoint.torch.save

    def disk_fills_at_step_2(state, handle, *args, **kwargs):
        if state.get("step") == 2:
            handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_at_step_2)
    checkpoints = tmp_path / "outputs" / "checkpoints"
    with pytest.raises(CheckpointError, match=r"step-00000002\.pt: the disk is full; last complete checkpoint: .*step-00000001\.pt"):
        run(make_config("train.iterations=3", "train.ckpt_every=1", "train.keep_checkpoints=1"))
    assert sorted(path.name for path in checkpoints.iterdir()) == [".lock", "step-00000001.pt"]  # no temp file
    assert load_checkpoint(checkpoints / "step-00000001.pt")["step"] == 1
    assert mlflow_store.only_run().info.status == "FAILED"


class Payload:
    """Unpickling this runs a shell command (creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_checkpoint_with_a_pickled_object_is_refused(make_config, mlflow_store, tmp_path: Path):
    checkpoints = tmp_path / "outputs" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "student": {}, "evil": Payload(marker)}, checkpoints / "step-00000002.pt")
    # Named by path it is refused; ``auto`` would set it aside as unloadable and take an older
    # one (tests/test_checkpoint.py). Either way its code never runs.
    with pytest.raises(CheckpointError, match=r"could not load checkpoint .*step-00000002\.pt.*[Ww]eights.only"):
        run(make_config("train.iterations=4", f"train.resume={checkpoints / 'step-00000002.pt'}"))
    assert not marker.exists()
    assert mlflow_store.runs() == []
    # Nothing process-wide is left behind: the next run here may choose another precision.
    from accelerate.state import AcceleratorState

    assert not AcceleratorState._shared_state


def test_auto_resume_with_every_checkpoint_unloadable_stops_instead_of_starting_over(make_config, mlflow_store,
                                                                                      tmp_path: Path):
    """The only checkpoint truncated: ``train.resume=auto`` used to start a new MLflow run from
    step 0 and exit 0, throwing the run's progress away without a word in its console.log."""
    run(make_config("train.iterations=2", "train.ckpt_every=2"))
    first = mlflow_store.only_run()
    checkpoints = tmp_path / "outputs" / "checkpoints"
    (only,) = sorted(checkpoints.glob("step-*.pt"))
    only.write_bytes(only.read_bytes()[:1000])
    for _ in range(2):  # a scheduler's every retry is refused alike
        with pytest.raises(CheckpointError, match=r"train.resume=auto: no checkpoint in .* loads \(1 unloadable"):
            run(make_config("train.iterations=4", "train.resume=auto"))
    assert [r.info.run_id for r in mlflow_store.runs()] == [first.info.run_id]
    assert (checkpoints / "unloadable" / only.name).is_file()


def test_a_checkpoint_set_aside_at_resume_is_said_in_the_runs_console_log(make_config, mlflow_store, tmp_path: Path):
    """The warning came before the run's console.log existed: on the console only."""
    run(make_config("train.iterations=2", "train.ckpt_every=1", "train.keep_checkpoints=2"))
    checkpoints = tmp_path / "outputs" / "checkpoints"
    (checkpoints / "step-00000002.pt").write_bytes(b"PK\x03\x04 truncated")
    run(make_config("train.iterations=3", "train.ckpt_every=1", "train.resume=auto"))
    text = (tmp_path / "outputs" / "console.log").read_text()
    assert "step-00000002.pt" in text and "trying the next older checkpoint" in text
    assert text.count("trying the next older checkpoint") == 1


def test_a_cpu_run_leaves_no_device_choice_behind(make_config, mlflow_store):
    """``train.cpu=true`` must not stick to the process: the next run here may use a GPU."""
    from accelerate.state import AcceleratorState, PartialState

    run(make_config("train.iterations=1", "train.cpu=true"))
    assert mlflow_store.only_run().info.status == "FINISHED"
    assert not AcceleratorState._shared_state and not PartialState._shared_state


@pytest.mark.slow
def test_a_killed_loader_worker_saves_a_checkpoint_and_stops_with_one_line(tiny_args, trainer, mlflow_store,
                                                                          tmp_path: Path):
    """kill -9 of a DataLoader worker (what the out-of-memory killer does): the run saves its
    weights, says so in one line (no traceback), ends FAILED with status 1, and resumes."""
    import psutil

    checkpoints = tmp_path / "outputs" / "checkpoints"
    args = [*tiny_args(), "train.ckpt_every=2", "train.keep_checkpoints=5", "data.num_workers=1"]
    process = trainer.start([*args, "train.iterations=100000"])
    _wait_for(lambda: (checkpoints / "step-00000002.pt").exists(), process, what="the first checkpoint")
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)]
    assert workers, "no loader worker to kill"
    for worker in workers:
        worker.kill()
    assert process.wait(timeout=120) == 1, process.log_path.read_text()[-3000:]
    output = process.log_path.read_text()
    assert "ssod-train: error: a data loader worker died" in output and "Traceback" not in output
    step = int(output.split("checkpoint saved at step ")[1].split(":")[0])
    assert step >= 2 and load_checkpoint(checkpoints / f"step-{step:08d}.pt")["step"] == step
    assert mlflow_store.only_run().info.status == "FAILED"
    resumed = trainer.start([*args, f"train.iterations={step + 2}", "train.resume=auto"], log_name="resume.log")
    assert resumed.wait(timeout=240) == 0, resumed.log_path.read_text()[-3000:]
    assert mlflow_store.only_run().info.status == "FINISHED"
