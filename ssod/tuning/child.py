"""A trial as its own process group: ``accelerate launch ... -m ssod.tune trial``.

The worker writes a ``TrialSpec`` (overrides + run tags) to a JSON file and launches the
child; rank 0 of the child appends one JSON line per evaluation to a relay file
(``{"step": 400, "metrics": {...}}``) and a last line with the final metrics. The worker
tails the relay (``read_relay``) to feed the pruner and answers each evaluation with one
line in the ack file, ``continue`` or ``stop`` (``write_ack``). The child waits for that
answer before its next step, so a pruned trial stops at the step it was judged at, however
fast its steps are. The child watches its worker and stops itself (SIGTERM: checkpoint,
run KILLED) if the worker dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, open_dict

from ssod.config import compose
from ssod.tuning.processes import process_alive, start_ticks

log = logging.getLogger(__name__)


@dataclass
class TrialSpec:
    """What a trial trains: Hydra overrides plus the MLflow tags of its run."""

    overrides: list[str]
    tags: dict[str, str]

    def config(self) -> DictConfig:
        cfg = compose(self.overrides)
        with open_dict(cfg):  # dotted tag names cannot be written as overrides
            for key, value in self.tags.items():
                cfg.tracking.tags[key] = value
        return cfg

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "TrialSpec":
        return cls(**json.loads(Path(path).read_text()))


def read_relay(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines written after ``offset``; a half-written last line waits."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


ACK_TIMEOUT_S = 120.0


def ack_path(relay_path: Path) -> Path:
    return Path(relay_path).with_suffix(".ack")


def write_ack(relay_path: Path, answer: str) -> None:
    """The worker's answer to one relayed evaluation: ``continue`` or ``stop``."""
    with open(ack_path(relay_path), "a") as handle:
        handle.write(answer + "\n")
        handle.flush()


def wait_for_ack(relay_path: Path, count: int, timeout_s: float = ACK_TIMEOUT_S) -> Optional[str]:
    """The worker's answer to evaluation number ``count`` (1-based), or None after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answers = ack_path(relay_path).read_text().split()
        except FileNotFoundError:
            answers = []
        if len(answers) >= count:
            return answers[count - 1]
        time.sleep(0.02)
    return None


def accelerate_command(processes: int, extra_args: list[str], spec_path: Path, relay_path: Path) -> list[str]:
    """``accelerate launch`` of ``ssod.tune trial`` on this worker's devices."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        import torch

        gpu = torch.cuda.device_count() > 0
    else:
        gpu = devices.strip() not in ("", "-1")
    # Precision: the trial's train.mixed_precision when set (it wins over this launcher's "no").
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    if processes > 1:
        # Several workers on one machine each launch a job: each needs its own port.
        command += ["--multi_gpu"] if gpu else ["--cpu"]
        command += ["--main_process_port", str(_free_port())]
    elif not gpu:
        command += ["--cpu"]
    if not gpu:
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        command += ["--num_cpu_threads_per_process", str(max(1, threads // processes))]
    return [
        *command, *extra_args, "-m", "ssod.tune", "trial",
        "--spec", str(spec_path), "--relay", str(relay_path),
        "--parent-pid", str(os.getpid()), "--parent-started", str(start_ticks(os.getpid()) or ""),
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_main(spec_path: Path, relay_path: Path, parent_pid: int, parent_started: Optional[int]) -> int:
    """Body of ``ssod-tune trial`` (every rank): train, relay evaluations to the worker."""
    from ssod.training import run

    _stop_when_gone(parent_pid, parent_started)
    spec = TrialSpec.load(spec_path)
    cfg = spec.config()
    last = {"step": 0}

    def relay(step: int, metrics: dict[str, float]) -> None:
        last["step"] = step
        if last.get("stopping"):
            return  # the worker has judged the trial; an evaluation on the way out needs no answer
        last["count"] = last.get("count", 0) + 1
        _append(relay_path, {"step": step, "metrics": metrics})
        answer = wait_for_ack(relay_path, last["count"])
        if answer is None:
            log.warning("no answer from the tuning worker for the evaluation at step %d; going on", step)
        elif answer == "stop":
            # The stop flag is set before the next step's all-reduce, so every rank stops
            # together at the next step, with a checkpoint.
            last["stopping"] = True
            os.kill(os.getpid(), signal.SIGTERM)

    metrics = run(cfg, on_eval=relay)
    if int(os.environ.get("RANK", "0")) == 0:
        _append(relay_path, {"final": True, "metrics": metrics, "completed": completed(metrics, last["step"], cfg.train.iterations)})
    return 0


def completed(metrics: dict, last_eval_step: int, iterations: int) -> bool:
    """Whether training ran to its end: not stopped by a signal (``ssod.training.run`` says
    KILLED) and evaluated at the last iteration (it always does when it gets there)."""
    return getattr(metrics, "status", "FINISHED") != "KILLED" and last_eval_step >= iterations


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=float) + "\n")
        handle.flush()


def _stop_when_gone(pid: int, started: Optional[int]) -> None:
    """SIGTERM ourselves (checkpoint, then stop) if the worker that owns us dies."""

    def watch() -> None:
        while process_alive(pid, started):
            time.sleep(2.0)
        log.warning("the tuning worker (pid %d) is gone: stopping this trial", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="worker-watchdog", daemon=True).start()
