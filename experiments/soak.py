"""Soak run: one training survives its faults for half an hour and ends as if nothing happened.

A small Polishing Teacher training (CPU, one thread, one loader worker per loader) logs every
step to a real ``mlflow server`` and writes its folder on a small tmpfs. While it trains, an
injector cycles through the faults a week on a shared cluster brings:

- ``mlflow_restart``: the tracking server is killed and started again ``--outage`` s later
  (the training goes on; what it could not send is held, then sent);
- ``sigterm``: the scheduler's stop (the run checkpoints and exits 143; it is resumed with
  ``train.resume=auto``);
- ``kill_loader_worker``: the out-of-memory killer takes a data loader worker (kill -9; the
  run checkpoints and exits 1; resumed);
- ``disk_full``: the run's filesystem is filled for ``--full-for`` s (a checkpoint written
  then fails with a clear error, exit 2; resumed once space is back).

A reference run of the same config, trained beside it from the start without a fault, is
the yardstick. After ``--minutes`` the soak run's last resume sets ``train.iterations`` to the
next evaluation step, so it finishes there (the iteration count only says where a run ends:
the schedule's steps are fixed), and is compared with the reference up to that step. Checked: the soak run is one MLflow run, FINISHED, with every step's
metrics exactly once and equal to the reference's, bit for bit (timings and ``system/*``
aside), and its final weights equal the reference's. Prints the table of faults injected and
held, and writes it with the checks to ``<out-dir>/soak.{json,md}``::

    sudo-less root shell: .venv/bin/python experiments/soak.py --minutes 30

Needs root for the tmpfs (``mount -t tmpfs``); ``--no-tmpfs`` skips the disk fault.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A small run a CPU thread trains at a few steps a second: every method part acts (burn-in
# 20 steps, then pseudo labels, polishing, EMA), loaders have workers to kill.
CONFIG = [
    "experiment=synthetic", "~experiment_method", "method=polish_teacher", "model=resnet18_fpn",
    "data.synthetic.num_train=60", "data.synthetic.num_val=8", "data.percent=20", "data.num_workers=1",
    "data.val_max_images=4", "data.train_min_sizes=[96,128]", "data.train_max_size=160", "data.test_size=96",
    "data.test_max_size=160", "model.fpn_channels=32", "model.box_head_dim=64", "method.polish_hidden=64",
    "method.reg_samples=8", "method.cls_samples=[4,4]", "method.reg_jitter_times=4",
    "method.pseudo_label_initial_score_thr=0.0", "method.unsup_start=20", "method.unsup_warmup=20",
    "train.log_every=1", "train.ckpt_every=25", "train.keep_checkpoints=2", "train.warmup_iters=10",
    "train.lr_steps=[100000]", "train.progress=false", "train.num_vis_images=0", "train.cpu=true",
    "train.batch_labeled=1", "train.batch_unlabeled=1", "train.evaluate_test=false",
    "tracking.log_checkpoint_artifact=false", "tracking.log_model=false", "tracking.system_metrics=false",
    "tracking.experiment=soak",
]
EVAL_EVERY = 200
FAULTS = ("mlflow_restart", "sigterm", "kill_loader_worker", "disk_full")
UNCOMPARED = ("sec_per_iter", "seconds")  # timings: the only numbers allowed to differ


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on loopback with its own SQLite store and artifact folder."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port, self.process = directory, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start; see {self.directory / 'server.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # a crash, not a clean shutdown
            self.process.wait()
        self.process = None


class SmallDisk:
    """A tmpfs of ``size_mb`` for the run's folder, which ``fill`` fills up and ``free`` frees."""

    def __init__(self, mount_point: Path, size_mb: int) -> None:
        self.mount_point, self.ballast = mount_point, mount_point / "ballast"
        mount_point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)], check=True)

    def fill(self) -> None:
        with open(self.ballast, "wb", buffering=0) as ballast:  # unbuffered: nothing left to flush at close
            for chunk in (1 << 20, 4096):  # then the last partial megabyte
                try:
                    while True:
                        ballast.write(b"\0" * chunk)
                except OSError:
                    pass

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount_point)], check=False)


@dataclass
class Outcome:
    fault: str
    at_s: float
    what_happened: str
    held: bool


@dataclass
class Soak:
    args: argparse.Namespace
    root: Path
    server: MlflowServer
    disk: SmallDisk | None
    outcomes: list[Outcome] = field(default_factory=list)
    starts: int = 0
    process: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def run_dir(self) -> Path:
        return (self.disk.mount_point if self.disk else self.root) / "soak-run"

    def start_training(self, iterations: int, resume: bool) -> None:
        self.starts += 1
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.root / "soak-train.log", "a")
        log.write(f"\n===== start {self.starts} (iterations={iterations}, resume={resume}) =====\n")
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ssod.train", *CONFIG, f"data.cache_dir={self.root / 'cache'}",
             f"train.eval_every={EVAL_EVERY}", f"train.iterations={iterations}", f"train.output_dir={self.run_dir}",
             f"tracking.uri={self.server.uri}", *(["train.resume=auto"] if resume else [])],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def step_reached(self) -> int:
        steps = [int(p.stem.split("-")[1]) for p in (self.run_dir / "checkpoints").glob("step-*.pt")] \
            if (self.run_dir / "checkpoints").is_dir() else []
        return max(steps, default=0)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def loader_workers(self) -> list[int]:
        """The training's child processes (its data loader workers)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(stat.parent.name))
        return children

    # ------------------------------------------------------------------ faults

    def mlflow_restart(self) -> Outcome:
        self.server.stop()
        time.sleep(self.args.outage)
        self.server.start()
        code = self.process.poll()
        return Outcome("mlflow_restart", self.elapsed(), f"server down {self.args.outage:.0f} s; training "
                       + ("went on" if code is None else f"exited {code}"), code is None or code == 0)

    def sigterm(self) -> Outcome:
        self.process.send_signal(signal.SIGTERM)
        code = self.wait_exit(300)
        return Outcome("sigterm", self.elapsed(), f"exit {code} at checkpoint {self.step_reached()}; resumed", code == 143)

    def kill_loader_worker(self) -> Outcome:
        workers = self.loader_workers()
        if not workers:
            return Outcome("kill_loader_worker", self.elapsed(), "no loader worker alive at that moment", True)
        os.kill(workers[0], signal.SIGKILL)
        code = self.wait_exit(300)
        return Outcome("kill_loader_worker", self.elapsed(),
                       f"worker {workers[0]} killed; exit {code} at checkpoint {self.step_reached()}; resumed", code == 1)

    def disk_full(self) -> Outcome:
        if self.disk is None:
            return Outcome("disk_full", self.elapsed(), "skipped (--no-tmpfs)", True)
        self.disk.fill()
        code = self.wait_exit(self.args.full_for)
        self.disk.free()
        said = ""
        if code is not None:
            lines = (self.root / "soak-train.log").read_text().splitlines()
            said = next((line for line in reversed(lines) if "disk is full" in line or "No space" in line), "")[:160]
        return Outcome("disk_full", self.elapsed(), f"full for {self.args.full_for:.0f} s; "
                       + ("trained through it" if code is None else f"exit {code}: {said!r}; resumed"),
                       code in (None, 2) and (code is None or "disk is full" in said))


def compare(soak_uri: str, soak_run: str, reference_uri: str, reference_run: str, last: int) -> tuple[list[str], int]:
    """Differences between the two runs' metric histories up to step ``last`` (timings and
    system/* aside), and how many metric values were compared."""
    from mlflow.tracking import MlflowClient

    soak, reference = MlflowClient(soak_uri), MlflowClient(reference_uri)
    keys = sorted(k for k in reference.get_run(reference_run).data.metrics
                  if not k.startswith("system/") and not k.endswith(UNCOMPARED))
    problems, values = [], 0
    for key in keys:
        theirs = [(m.step, m.value) for m in reference.get_metric_history(reference_run, key) if m.step <= last]
        ours = [(m.step, m.value) for m in soak.get_metric_history(soak_run, key)]
        steps = [step for step, _ in ours]
        if len(set(steps)) != len(steps):
            problems.append(f"{key}: a step logged twice")
        if sorted(ours) != sorted(theirs):
            problems.append(f"{key}: {len(ours)} values differ from the reference's {len(theirs)}")
        values += len(theirs)
    return problems, values


def same_weights(a: Path, b: Path) -> list[str]:
    import torch

    left, right = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return [f"{part}.{name}" for part in ("student", "teacher") for name, value in right[part].items()
            if not torch.equal(left[part][name], value)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long faults are injected")
    parser.add_argument("--every", type=float, default=90.0, help="seconds between faults")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the MLflow server stays down")
    parser.add_argument("--full-for", type=float, default=45.0, help="seconds the disk stays full")
    parser.add_argument("--no-tmpfs", action="store_true", help="no tmpfs, no disk fault (not root)")
    parser.add_argument("--out-dir", default="experiments/results")
    parser.add_argument("--work-dir", default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="ssod-soak-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root / "mlflow-server")
    server.start()
    disk = None if args.no_tmpfs else SmallDisk(root / "small-disk", 1024)
    soak = Soak(args, root, server, disk)
    big = 10 ** 6
    reference_dir = root / "reference"
    reference = None
    try:
        soak.start_training(big, resume=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        reference = subprocess.Popen(
            # Its own copy of the generated data (the same images): two first uses of one cache race.
            [sys.executable, "-m", "ssod.train", *CONFIG, f"data.cache_dir={root / 'cache-reference'}",
             f"train.eval_every={EVAL_EVERY}", f"train.iterations={big}", f"train.output_dir={reference_dir}",
             f"train.ckpt_every={EVAL_EVERY}", "train.keep_checkpoints=1000",
             f"tracking.uri=sqlite:///{root / 'reference.db'}"],
            cwd=REPO, env=env, stdout=open(root / "reference.log", "w"), stderr=subprocess.STDOUT)
        next_fault, index = time.monotonic() + args.every, 0
        while soak.elapsed() < 60 * args.minutes:
            code = soak.process.poll()
            if code is not None:  # exited without a fault of ours: a finding; resume and go on
                soak.outcomes.append(Outcome("(none)", soak.elapsed(), f"training exited {code} by itself", False))
                soak.start_training(big, resume=True)
            if time.monotonic() >= next_fault:
                fault = FAULTS[index % len(FAULTS)]
                outcome = getattr(soak, fault)()
                soak.outcomes.append(outcome)
                print(f"[{outcome.at_s / 60:5.1f} min] {fault}: {outcome.what_happened} "
                      f"({'held' if outcome.held else 'NOT HELD'})", flush=True)
                if soak.process.poll() is not None:
                    soak.start_training(big, resume=True)
                index, next_fault = index + 1, time.monotonic() + args.every
            time.sleep(1)
        # The end: stop, and finish at the next evaluation step.
        soak.process.send_signal(signal.SIGTERM)
        soak.wait_exit(300)
        final_step = (soak.step_reached() // EVAL_EVERY + 1) * EVAL_EVERY
        print(f"faults done after {soak.elapsed() / 60:.1f} min at step {soak.step_reached()}; finishing at {final_step}",
              flush=True)
        soak.start_training(final_step, resume=True)
        finished = soak.wait_exit(4 * 3600)
        reference_checkpoint = reference_dir / "checkpoints" / f"step-{final_step:08d}.pt"
        while not reference_checkpoint.is_file() and reference.poll() is None:
            time.sleep(2)  # the reference is usually ahead (it lost no time to faults)
        reference.send_signal(signal.SIGTERM)
        reference_code = reference.wait()
        final = json.loads((soak.run_dir / "final_metrics.json").read_text())
        from mlflow.tracking import MlflowClient

        reference_store = f"sqlite:///{root / 'reference.db'}"
        (reference_run,) = MlflowClient(reference_store).search_runs(
            [MlflowClient(reference_store).get_experiment_by_name("soak").experiment_id])
        problems, compared = compare(server.uri, final["mlflow_run_id"], reference_store, reference_run.info.run_id,
                                     final_step)
        runs = MlflowClient(server.uri).search_runs([MlflowClient(server.uri).get_experiment_by_name("soak").experiment_id])
        status = {r.info.run_id: r.info.status for r in runs}
        weights = same_weights(soak.run_dir / "checkpoints" / f"step-{final_step:08d}.pt", reference_checkpoint)
        checks = {
            "soak run exit": finished, "reference exit": reference_code, "final step": final_step,
            "MLflow runs in the soak experiment": len(runs), "soak run status": status.get(final["mlflow_run_id"]),
            "metric values compared": compared, "metric differences": problems, "weights differing": weights,
            "trainings started": soak.starts, "minutes": round(soak.elapsed() / 60, 1),
        }
        passed = (finished == 0 and reference_code in (0, 143) and len(runs) == 1 and status.get(final["mlflow_run_id"]) == "FINISHED"
                  and not problems and not weights and all(o.held for o in soak.outcomes))
        write_report(Path(args.out_dir), soak.outcomes, checks, passed)
        return 0 if passed else 1
    finally:
        if soak.process is not None and soak.process.poll() is None:
            soak.process.kill()
        if reference is not None and reference.poll() is None:
            reference.kill()
        server.stop()
        if disk is not None:
            disk.unmount()


def write_report(out_dir: Path, outcomes: list[Outcome], checks: dict, passed: bool) -> None:
    counts = {fault: [o for o in outcomes if o.fault == fault] for fault in dict.fromkeys(o.fault for o in outcomes)}
    lines = ["# Soak run", "", f"Command: `python experiments/soak.py {' '.join(sys.argv[1:])}`", "",
             f"Result: **{'passed' if passed else 'FAILED'}**", "",
             "| fault | injected | held | what happened (first) |", "| --- | --- | --- | --- |"]
    lines += [f"| {fault} | {len(group)} | {sum(o.held for o in group)}/{len(group)} | {group[0].what_happened} |"
              for fault, group in counts.items()]
    lines += ["", "| check | value |", "| --- | --- |"]
    lines += [f"| {key} | {value if not isinstance(value, list) else (value or 'none')} |" for key, value in checks.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.md").write_text("\n".join(lines) + "\n")
    (out_dir / "soak.json").write_text(json.dumps({"passed": passed, "checks": checks,
                                                    "faults": [vars(o) for o in outcomes]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
