"""Atomic checkpoints: complete or absent, keep-N after completion, safe loading, RNG round trip."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ssod import checkpoint
from ssod.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3, 2), float(step)), "names": ["a", "b"], "nested": {"lr": 0.1}}


def test_save_then_load_round_trips_and_leaves_no_temp_file(tmp_path: Path):
    path = save_checkpoint(tmp_path, 7, _state(7))
    assert path == tmp_path / "step-00000007.pt" == checkpoint_path(tmp_path, 7)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["names"] == ["a", "b"] and loaded["nested"] == {"lr": 0.1}
    assert torch.equal(loaded["weights"], torch.full((3, 2), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007.pt"]


def test_keep_n_deletes_only_older_checkpoints(tmp_path: Path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    save_checkpoint(tmp_path, 5, _state(5), keep=0)  # keep <= 0: keep everything
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4, 5]


def test_keep_n_never_deletes_the_new_checkpoint_nor_later_ones(tmp_path: Path):
    """Checkpoints of a later step are not this run's past: keeping the newest few must not
    delete the one just written because another run's have higher step numbers."""
    for step in (200, 300):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert save_checkpoint(tmp_path, 100, _state(100), keep=2).is_file()
    save_checkpoint(tmp_path, 150, _state(150), keep=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [150, 200, 300]


def test_set_aside_moves_every_checkpoint_of_a_folder_the_resumed_one_is_not_from(tmp_path: Path, monkeypatch):
    here, elsewhere = tmp_path / "run" / "checkpoints", tmp_path / "other"
    for step in (100, 300):
        save_checkpoint(here, step, _state(step))
    save_checkpoint(elsewhere, 200, _state(200))
    assert checkpoint.set_aside_other_checkpoints(here, here / "step-00000300.pt", 300) is None
    aside = checkpoint.set_aside_other_checkpoints(here, elsewhere / "step-00000200.pt", 200)
    assert list_checkpoints(here) == []
    assert sorted(path.name for path in aside.iterdir()) == ["step-00000100.pt", "step-00000300.pt"]
    save_checkpoint(here, 300, _state(300))  # a second set-aside in the same second gets its own folder
    monkeypatch.setattr(checkpoint.time, "strftime", lambda *args: aside.name.removeprefix("superseded-"))
    again = checkpoint.set_aside_other_checkpoints(here, here / "step-00000100.pt", 100)
    assert again.name == aside.name + "-1" and [path.name for path in again.iterdir()] == ["step-00000300.pt"]
    # A checkpoint named in the folder through a link to a file elsewhere is of this folder.
    save_checkpoint(here, 400, _state(400))
    (here / "step-00000200.pt").symlink_to(elsewhere / "step-00000200.pt")
    third = checkpoint.set_aside_other_checkpoints(here, here / "step-00000200.pt", 200)
    assert [path.name for path in third.iterdir()] == ["step-00000400.pt"]
    assert [step for step, _ in list_checkpoints(here)] == [200]


def test_old_checkpoints_are_deleted_only_after_the_new_one_is_complete(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1), keep=1)
    seen_during_write = []
    real_save = torch.save

    def save_and_look(state, handle):
        # While the new checkpoint is being written, the old one must still be there.
        seen_during_write.extend(p.name for p in tmp_path.iterdir())
        real_save(state, handle)

    monkeypatch.setattr(checkpoint.torch, "save", save_and_look)
    save_checkpoint(tmp_path, 2, _state(2), keep=1)
    assert "step-00000001.pt" in seen_during_write
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]


def test_a_crash_mid_write_leaves_the_previous_checkpoint_as_the_newest(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1))

    def half_write_then_crash(state, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkpoint.torch, "save", half_write_then_crash)
    with pytest.raises(CheckpointError, match=r"step-00000002\.pt.*I/O error.*step-00000001\.pt"):
        save_checkpoint(tmp_path, 2, _state(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "step-00000001.pt"


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1), keep=1)

    def disk_full(state, handle):
        handle.write(b"\0" * 128)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="disk is full") as caught:
        save_checkpoint(tmp_path, 2, _state(2), keep=1)
    assert "step-00000001.pt" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    assert load_checkpoint(tmp_path / "step-00000001.pt")["step"] == 1


def test_stale_temp_files_are_ignored_and_cleaned_up(tmp_path: Path):
    save_checkpoint(tmp_path, 1, _state(1))
    stale = tmp_path / ".step-00000002.pt.tmp-99999"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"partial")
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "step-00000001.pt"
    save_checkpoint(tmp_path, 3, _state(3))
    assert not stale.exists()


class Payload:
    """Anything with a ``__reduce__`` runs code when unpickled: here, it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path: Path):
    path = tmp_path / "step-00000001.pt"
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "student": {"w": torch.zeros(1)}, "evil": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*[Ww]eights.only"):
        load_checkpoint(path)
    assert not marker.exists()
    assert find_resume_checkpoint("auto", tmp_path) == path  # found, but refused when loaded


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path: Path):
    complete = save_checkpoint(tmp_path, 1, _state(1))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(complete.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="could not load checkpoint .*truncated.pt"):
        load_checkpoint(truncated)


def test_find_resume_checkpoint(tmp_path: Path):
    assert find_resume_checkpoint(None, tmp_path) is None
    assert find_resume_checkpoint("", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path / "absent") is None  # nothing yet: start fresh
    for step in (2, 10):
        save_checkpoint(tmp_path, step, _state(step), keep=5)
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "step-00000010.pt"
    assert find_resume_checkpoint(str(tmp_path), tmp_path / "other") == tmp_path / "step-00000010.pt"
    explicit = tmp_path / "step-00000002.pt"
    assert find_resume_checkpoint(str(explicit), tmp_path) == explicit
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        find_resume_checkpoint(str(tmp_path / "missing.pt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "empty"), tmp_path)


def _draw() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.normal()


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    path = save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    expected = _draw()
    _draw()
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == expected


# --- reliability: full disk from torch's writer, concurrent runs, unwritable and corrupt --------


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_any_failure_while_writing_removes_the_temp_file_and_names_a_full_disk(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1), keep=1)

    def zip_writer_fails(state, handle):
        handle.write(b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", zip_writer_fails)
    with pytest.raises(CheckpointError, match="file write failed") as caught:
        save_checkpoint(tmp_path, 2, _state(2), keep=1)
    assert "disk is full" not in str(caught.value)  # plenty of space here: not called a full disk
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    free = checkpoint.shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: free)
    with pytest.raises(CheckpointError, match="the disk is full .*file write failed.*step-00000001.pt"):
        save_checkpoint(tmp_path, 2, _state(2), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]

    def interrupted(state, handle):
        handle.write(b"\0" * 16)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]


def test_cleanup_removes_only_temp_files_of_dead_writers(tmp_path: Path):
    live = tmp_path / f".step-00000002.pt.tmp-{os.getppid()}"  # another live process is writing it
    dead = tmp_path / f".step-00000002.pt.tmp-{_dead_pid()}"
    live.write_bytes(b"in flight")
    dead.write_bytes(b"partial")
    save_checkpoint(tmp_path, 3, _state(3))
    assert live.exists() and not dead.exists()


def test_a_second_training_into_a_locked_directory_is_refused(tmp_path: Path):
    first = checkpoint.DirectoryLock(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=rf"in use by another training \(pid {os.getpid()} on "):
        checkpoint.DirectoryLock(tmp_path / "checkpoints")
    first.release()
    checkpoint.DirectoryLock(tmp_path / "checkpoints").release()


def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path: Path):
    import subprocess
    import sys

    code = f"from ssod.checkpoint import DirectoryLock; lock = DirectoryLock({str(tmp_path)!r}); print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
        checkpoint.DirectoryLock(tmp_path)
    holder.kill()
    holder.wait()
    checkpoint.DirectoryLock(tmp_path).release()  # the kernel dropped the dead holder's lock


def test_an_unwritable_output_directory_is_an_error_at_start(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"cannot write to the checkpoint directory {blocker}/checkpoints"):
        checkpoint.DirectoryLock(blocker / "checkpoints")


def test_auto_resume_skips_an_unloadable_newest_checkpoint_and_keeps_it_aside(tmp_path: Path, caplog):
    save_checkpoint(tmp_path, 1, _state(1), keep=5)
    save_checkpoint(tmp_path, 2, _state(2), keep=5)
    checkpoint_path(tmp_path, 3).write_bytes(b"PK\x03\x04 truncated")
    path, state = checkpoint.load_newest_loadable(tmp_path)
    assert path == checkpoint_path(tmp_path, 2) and state["step"] == 2
    assert (tmp_path / "unloadable" / "step-00000003.pt").read_bytes() == b"PK\x03\x04 truncated"  # never deleted
    assert "step-00000003.pt" in caplog.text and "trying the next older checkpoint" in caplog.text
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]
    for step in (1, 2):
        checkpoint_path(tmp_path, step).write_bytes(b"garbage")
    # None loads: refused in one line, not a silent new start from step 0; every later try too.
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"^train.resume=auto: no checkpoint in .* loads \(3 unloadable, kept in "
                                                  r".*unloadable\); to start this run over") as refused:
            checkpoint.load_newest_loadable(tmp_path)
        assert "\n" not in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "unloadable").iterdir()) == [f"step-0000000{i}.pt" for i in (1, 2, 3)]
    # A folder that never had a checkpoint starts fresh.
    assert checkpoint.load_newest_loadable(tmp_path / "new") == (None, None)


def test_an_unloadable_checkpoint_is_named_in_one_line(tmp_path: Path):
    path = checkpoint_path(tmp_path, 4)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"could not load checkpoint {path} (truncated, corrupt or not a checkpoint of ours): ")
    assert "\n" not in message and len(message) < 400


HOLD_LOCK_AND_FORK = """
import multiprocessing, os, sys, time
from ssod.checkpoint import DirectoryLock
lock = DirectoryLock(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
open(sys.argv[2], "w").write(str(child.pid))
os.kill(os.getpid(), 9)  # the training dies; its forked worker lives on for a while
"""


def test_a_killed_trainings_forked_children_do_not_keep_its_folder_locked(tmp_path: Path):
    """After kill -9 of the training, its data loader workers lived a few seconds more and
    held the folder's lock: the scheduler's immediate restart was refused."""
    import subprocess
    import sys

    script = tmp_path / "hold.py"
    script.write_text(HOLD_LOCK_AND_FORK)
    pid_file = tmp_path / "child.pid"
    # Not through pipes: the child would keep them open, and the wait with them.
    trainer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), str(pid_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert trainer.wait(timeout=60) == -9
    child = int(pid_file.read_text())
    try:
        os.kill(child, 0)  # still alive
        lock = checkpoint.DirectoryLock(tmp_path / "ckpt")  # not refused
        lock.release()
    finally:
        os.kill(child, 9)
