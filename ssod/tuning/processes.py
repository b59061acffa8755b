"""Processes on this machine: who a worker is, whether it lives, and stopping a trial's group.

Linux ``/proc`` is read where it exists: a zombie or a recycled PID is not mistaken for
a live process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def machine_id() -> str:
    """Host name plus PID namespace: two containers sharing a host name still differ."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _stat(pid: int | str) -> Optional[list[str]]:
    """Fields of ``/proc/<pid>/stat`` after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot); None if unknown or a zombie."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def process_alive(pid: int, started: Optional[int]) -> bool:
    """Whether ``pid`` runs and, if ``started`` is known, is the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc/self/stat").exists():
        return True
    ticks = start_ticks(pid)
    return ticks is not None and (started is None or ticks == started)


def group_alive(child: subprocess.Popen) -> bool:
    """Whether any live (non-zombie) process remains in the group ``child`` leads."""
    child.poll()  # reap the leader itself
    if Path("/proc/self/stat").exists():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(entry.name)
                if fields is not None and fields[0] != "Z" and int(fields[2]) == child.pid:
                    return True
        return False
    try:
        os.killpg(child.pid, 0)
    except ProcessLookupError:
        return False
    return True


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def terminate_group(child: subprocess.Popen, grace_s: float = 120.0) -> None:
    """SIGTERM the child's process group (each rank checkpoints); SIGKILL it only if some
    process is still there after ``grace_s``."""
    signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(child):
        log.warning("trial process group %d ignored SIGTERM for %.0f s: killing it", child.pid, grace_s)
        signal_group(child.pid, signal.SIGKILL)
    child.wait()
