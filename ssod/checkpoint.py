"""Atomic checkpoints: the newest *complete* checkpoint always wins.

A checkpoint is one file ``<dir>/step-00001234.pt`` holding only tensors, numbers,
strings and containers of them, loaded back with ``torch.load(weights_only=True)`` so a
checkpoint can never run code. It is written to a hidden temp file in the same
directory, flushed and fsync'ed, then renamed into place (atomic on POSIX); a process
killed mid-write leaves only a temp file, which is ignored and cleaned up. Older
checkpoints are deleted only after the new one is complete. A full disk is a clear error
and the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ssod.io import write_json_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")
# The checkpoint of the best evaluation so far (train.best_metric), and what it scored.
BEST_NAME = "best.pt"
BEST_RECORD = "best.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    temp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(directory)
    except BaseException as error:
        # Any failure (torch's zip writer raises RuntimeError on a full disk; Ctrl-C) leaves no temp file.
        temp.unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        previous = list_checkpoints(directory)
        kept = previous[-1][1] if previous else "none"
        reason = str(error)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason = "the disk is full"
        elif _disk_full(error, directory):
            reason = f"the disk is full ({error})"
        raise CheckpointError(f"could not write checkpoint {final}: {reason}; last complete checkpoint: {kept}") from error
    # Only this run's past: never the checkpoint just written, nor any of a later step.
    earlier = [path for saved, path in list_checkpoints(directory) if saved <= step]
    for old in earlier[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in directory.glob(".step-*.tmp-*"):
        if stale != temp and not _writer_alive(stale):
            stale.unlink(missing_ok=True)
    return final


# Below this much free space a failed write is taken for a full disk: torch's zip writer
# reports one as "file write failed", without the errno.
_NEARLY_FULL_BYTES = 64 * 2**20


def _disk_full(error: BaseException, directory: Path) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _writer_alive(temp: Path) -> bool:
    """Whether the process that is writing ``temp`` (``.step-N.pt.tmp-<pid>``) still runs."""
    try:
        pid = int(temp.name.rsplit("-", 1)[1])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True


# The file descriptors of the directory locks this process holds. A forked child (a data
# loader worker) shares each lock with its parent, and a flock lives while any process holds
# it: after a kill -9 of the training, its orphaned workers (alive a few seconds more) kept
# the folder locked and the scheduler's immediate restart was refused. A child lets go of
# them at once: its copy of the descriptor is pointed at /dev/null (the number stays valid,
# so the child's own copy of the file object closes nothing else later).
_HELD_LOCKS: set[int] = set()


def _let_go_of_locks_in_child() -> None:
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in _HELD_LOCKS:
            os.dup2(null, fd)
    finally:
        os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_let_go_of_locks_in_child)


class DirectoryLock:
    """An exclusive lock on a run's checkpoint directory, held while the run lives.

    ``fcntl.flock`` on ``<dir>/.lock``: the kernel releases it when the process ends, however
    it ends, so a lock left by a dead run is never in the way. A second training into the
    same directory gets a ``CheckpointError`` naming the holder. Taking it also proves at start
    that the directory can be written (not 4000 iterations later, at the first checkpoint).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.directory / ".lock", "a+")
        except OSError as error:
            raise CheckpointError(f"cannot write to the checkpoint directory {self.directory}: {error.strerror or error}; "
                                  "choose another train.output_dir") from error
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise CheckpointError(f"{self.directory} is in use by another training ({holder}): two runs in one "
                                  "directory would overwrite each other's checkpoints; choose another "
                                  "train.output_dir, or wait for that run to end") from error
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.handle.flush()
        _HELD_LOCKS.add(self.handle.fileno())

    def release(self) -> None:
        """Unlock; a directory this lock created and nothing else used is removed again (a
        run that failed at start leaves no empty folder behind)."""
        if self.handle.closed:
            return
        if self.created and [p.name for p in self.directory.iterdir()] == [".lock"]:
            (self.directory / ".lock").unlink()
            self.directory.rmdir()
        _HELD_LOCKS.discard(self.handle.fileno())
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_best(directory: Path, step: int, metric: str, value: float) -> Path:
    """Make ``<dir>/best.pt`` the checkpoint of ``step`` and ``best.json`` say which, with
    ``metric``'s ``value``. A hard link: no second copy while that step's file is kept, and
    the weights stay when keeping the newest few deletes it; a copy where the file system
    has no links."""
    directory = Path(directory)
    source, final = checkpoint_path(directory, step), directory / BEST_NAME
    temp = directory / f".{BEST_NAME}.tmp-{os.getpid()}"
    try:
        temp.unlink(missing_ok=True)
        try:
            os.link(source, temp)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                raise
            shutil.copyfile(source, temp)
        os.replace(temp, final)
        write_json_atomic({"step": step, "metric": metric, "value": value, "checkpoint": source.name},
                          directory / BEST_RECORD)
        _fsync_dir(directory)
    except OSError as error:
        temp.unlink(missing_ok=True)
        reason = "the disk is full" if error.errno == errno.ENOSPC else str(error)
        raise CheckpointError(f"could not make {final} the checkpoint of step {step}: {reason}") from error
    return final


def best_record(directory: Path) -> Optional[dict[str, Any]]:
    """What ``<dir>/best.json`` says of ``best.pt`` (step, metric, value), or None without both."""
    directory = Path(directory)
    if not (directory / BEST_NAME).is_file():
        return None
    try:
        return json.loads((directory / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return {}  # best.pt without its record (copied by hand): still the best checkpoint


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU. A file that does not
    load is a ``CheckpointError`` of one line: torch's message cut to its first line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        first = first if len(first) <= 240 else first[:237] + "..."
        raise CheckpointError(f"could not load checkpoint {path} (truncated, corrupt or not a checkpoint of ours): "
                              f"{first}") from error


def find_resume_checkpoint(resume: Optional[str], directory: Path) -> Optional[Path]:
    """``resume``: None/'' (start fresh), 'auto' (newest complete checkpoint, if any) or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        return found[-1][1] if found else None
    return checkpoint_file(resume, "train.resume")


def load_newest_loadable(directory: Path) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """``train.resume=auto``: the newest checkpoint of ``directory`` that loads, and its state.

    One that does not load (corrupt, truncated, unsafe) is moved to ``<dir>/unloadable/``,
    never deleted, with a warning, and the next older one is tried: a scheduler that always
    passes ``auto`` must not crash-loop on one bad file. (None, None) for a folder that never
    had a checkpoint; when every checkpoint it had is unloadable a ``CheckpointError``: a
    silent new start from step 0 would throw the run away (and every later ``auto`` would go
    on from that start).
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            aside = Path(directory) / "unloadable"
            aside.mkdir(exist_ok=True)
            try:
                os.replace(path, aside / path.name)
            except FileNotFoundError:
                continue  # another process of the same job moved it first
            log.warning("%s; moved it to %s and trying the next older checkpoint", error, aside / path.name)
    aside = Path(directory) / "unloadable"
    unloadable = sorted(aside.glob("step-*.pt")) if aside.is_dir() else []
    if unloadable:
        raise CheckpointError(
            f"train.resume=auto: no checkpoint in {directory} loads ({len(unloadable)} unloadable, kept in {aside}); "
            f"to start this run over from step 0 move {aside} away, or name an older copy with train.resume=<file>")
    return None, None


def refuse_foreign_checkpoints(directory: Path) -> None:
    """A fresh run must not write among another run's checkpoints: ``resume=auto`` would
    later continue whichever is newest, and keeping the newest few would delete its own."""
    found = list_checkpoints(directory)
    if found:
        raise CheckpointError(
            f"{directory} already holds checkpoints of an earlier run (newest: {found[-1][1].name}): "
            f"set train.resume=auto to continue it, or another train.output_dir (or none: every new run "
            f"then gets a folder of its own) for a new run"
        )


def is_in_folder(path: Path, directory: Path) -> bool:
    """Whether ``path`` is named in ``directory`` (a link there to a file elsewhere counts)."""
    directory = Path(directory)
    return directory.is_dir() and os.path.samefile(Path(path).absolute().parent, directory)


def set_aside_other_checkpoints(directory: Path, resumed: Path, step: int) -> Optional[Path]:
    """For a resume from a checkpoint named by path: move the checkpoints of ``directory``
    that are not its past to ``directory/superseded-<UTC time>/`` (nothing is deleted).

    Those are the ones after ``step`` and, when ``resumed`` lives in another directory, all
    of them. Left in place, ``train.resume=auto`` would later continue the newest of them,
    and keeping the newest few would never delete a later step (or would delete another
    run's earlier ones). Returns the folder, or None when nothing was moved.
    """
    directory = Path(directory)
    found = list_checkpoints(directory)
    elsewhere = bool(found) and not is_in_folder(resumed, directory)
    moving = [path for saved, path in found if saved > step or elsewhere]
    best = best_record(directory)
    if best is not None and (elsewhere or best.get("step", step + 1) > step):
        # The best of a history the resume leaves (or of unknown step): it goes with it.
        moving += [directory / name for name in (BEST_NAME, BEST_RECORD) if (directory / name).exists()]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = directory / f"superseded-{stamp}"
    for attempt in range(1, 1000):  # twice in one second: never mix two sets of files
        try:
            folder.mkdir()
            break
        except FileExistsError:
            folder = directory / f"superseded-{stamp}-{attempt}"
    for path in moving:
        os.replace(path, folder / path.name)
    _fsync_dir(directory)
    log.warning(
        "resuming from %s (step %d): %d file(s) of %s that are not its past (%s) moved to %s; "
        "train.resume=auto continues the newest checkpoint instead", resumed, step, len(moving), directory,
        ", ".join(path.name for path in moving), folder,
    )
    return folder


def checkpoint_file(path: str, option: str, prefer_best: bool = False) -> Path:
    """The checkpoint ``path`` names: a file, or a run's checkpoint directory or output
    directory (its newest complete checkpoint; with ``prefer_best`` its ``best.pt`` where it
    has one). ``option`` names the setting that gave ``path``, for the errors."""
    found = Path(path)
    if found.is_dir() and not list_checkpoints(found) and (found / "checkpoints").is_dir():
        found = found / "checkpoints"
    if found.is_dir() and prefer_best and (best := best_record(found)) is not None:
        log.info("%s: the best checkpoint, %s (step %s, %s %s)", path, found / BEST_NAME, best.get("step", "?"),
                 best.get("metric", "?"), best.get("value", "?"))
        return found / BEST_NAME
    if found.is_dir():
        checkpoints = list_checkpoints(found)
        if not checkpoints:
            raise CheckpointError(f"{option}={path}: no complete checkpoint in that directory")
        return checkpoints[-1][1]
    if not found.is_file():
        raise CheckpointError(f"{option}={path}: no such checkpoint file")
    return found


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``weights_only`` loading accepts."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], optional_prefix: str = "polisher.") -> list[str]:
    """Load ``weights`` into ``model``; keys under ``optional_prefix`` may be absent on either side.

    Used to start a run from another run's checkpoint (``train.init_from``), e.g. a
    supervised burn-in, whether or not either side has polishing networks. Any other
    missing or unexpected key is an error. Returns the optional keys left untouched.
    """
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own or not k.startswith(optional_prefix)}
    missing, unexpected = model.load_state_dict(usable, strict=False)
    required = [k for k in missing if not k.startswith(optional_prefix)]
    if required or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {required[:5]}, unexpected {unexpected[:5]}")
    return list(missing)
