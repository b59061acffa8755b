"""Tune Polishing Teacher's thresholds and loss weights with Optuna: ``ssod-tune``.

Run from the project directory (``optuna.db``, ``mlflow.db`` and ``outputs/tune/`` live there)::

    ssod-tune                                   # tune=synthetic, one worker, SQLite optuna.db
    ssod-tune tune=synthetic tune.n_trials=40 train.iterations=200   # non-tune keys: every trial
    ssod-tune --workers 2 --gpus 0,1            # two local workers sharing optuna.journal
    SSOD_OPTUNA_STORAGE=postgresql+psycopg2://user:pw@db:5432/optuna \\
        ssod-tune --workers 8 --gpus 0,1,2,3,4,5,6,7     # the same command on every machine
    ssod-tune tune=coco tune.launcher=accelerate tune.processes_per_trial=4 --workers 2 --gpus 0,1,2,3,4,5,6,7
    ssod-tune report tune=synthetic             # best params, best run id, plots -> parent run
    ssod-tune confirm tune=synthetic            # best vs default vs paper on other seeds, test split

The study is ``conf/tune/<name>.yaml`` (``ssod/tuning/schema.py`` documents every key).
Every trial composes ``tune.base_overrides`` + the other command-line overrides + its
sampled values and calls ``ssod.training.run``; each is a nested MLflow run under the study's
parent run. Internal commands: ``ssod-tune worker --index K ...`` (one worker, started by
the launcher) and ``ssod-tune trial --spec ...`` (one trial under ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import optuna

from ssod.cli import user_error_status
from ssod.masking import mask_console, mask_secrets
from ssod.mlflow_client import bound_requests
from ssod.tuning.burn_in import check_burn_in_space
from ssod.tuning.child import child_main
from ssod.tuning.confirm import confirm, markdown
from ssod.tuning.report import find_parent_run, write_report
from ssod.tuning.settings import StudySetup, load_setup
from ssod.tuning.storage import StorageUnavailable, check_not_mlflow, is_journal, open_storage, resolve_storage_url, usage
from ssod.tuning.workers import launch, run_worker

log = logging.getLogger("ssod.tune")

COMMANDS = ("run", "worker", "report", "confirm", "trial")

__all__ = ["main", "load_setup", "prepare", "run_worker", "launch", "report"]


def prepare(overrides: list[str], workers: Optional[int] = 1, storage: str = "", project_dir: Optional[Path] = None) -> StudySetup:
    """Compose the study config and resolve its storage (refusing the MLflow database)."""
    setup = load_setup(overrides, project_dir)
    check_burn_in_space(setup)
    setup.storage_url = resolve_storage_url(storage or setup.tune.storage, setup.project_dir, workers)
    check_not_mlflow(setup.storage_url, setup.tracking_uri)
    return setup


class StudyNotFound(LookupError):
    """``ssod-tune report`` found no such study (it reads; it never creates one)."""


def load_existing(setup: StudySetup, named: bool = True) -> optuna.Study:
    """The study, read from an existing storage; never creates one. ``named=False`` (no
    ``tune=`` on the command line): the study of the storage that was tuned last."""
    url = setup.storage_url
    local = Path(url.removeprefix("journal:")) if is_journal(url) else Path(url[len("sqlite:///"):])
    if (is_journal(url) or url.startswith("sqlite:///")) and not local.is_file():
        raise StudyNotFound(f"no Optuna storage at {local}: nothing has been tuned here (or pass --storage)")
    storage = open_storage(url, None, None, None) if is_journal(url) else optuna.storages.RDBStorage(url)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not named and summaries:
        latest = max(summaries, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0))
        setup.tune.study_name = latest.study_name
    names = sorted(s.study_name for s in summaries)
    if setup.tune.study_name not in names:
        raise StudyNotFound(f"study {setup.tune.study_name!r} is not in {mask_secrets(url)}; it holds {names or 'none'}")
    return optuna.load_study(study_name=setup.tune.study_name, storage=storage)


def report(setup: StudySetup, named: bool = True) -> dict:
    """``ssod-tune report``: read the study and write the report onto its existing parent run
    (closed FINISHED once the budget is spent). It creates nothing: no storage, no study, no
    MLflow run; without a parent run the report is only printed."""
    study = load_existing(setup, named)
    done = usage(study).spent(setup.tune.n_trials)
    return write_report(setup, study, find_parent_run(setup), "FINISHED" if done else None)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"ssod-tune{'' if command == 'run' else ' ' + command}",
        description="Optuna study over Polishing Teacher's thresholds and loss weights (conf/tune/*.yaml).",
        epilog="commands: ssod-tune [run] (the default) | ssod-tune report | ssod-tune confirm | internal: worker, trial. "
        "Example: ssod-tune --workers 2 --gpus 0,1 tune=synthetic tune.n_trials=40",
    )
    if command == "trial":
        parser.add_argument("--spec", type=Path, required=True)
        parser.add_argument("--relay", type=Path, required=True)
        parser.add_argument("--parent-pid", type=int, required=True)
        parser.add_argument("--parent-started", default="")
        return parser
    parser.add_argument("--storage", default="", help="Optuna storage URL (else tune.storage, $SSOD_OPTUNA_STORAGE, a local file)")
    if command == "run":
        parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
        parser.add_argument("--gpus", default=None, help="GPU indices, e.g. 0,1,2,3 (into CUDA_VISIBLE_DEVICES when it is set); 'cpu' for none; default: all visible")
    if command == "worker":
        parser.add_argument("--index", type=int, default=0)
    if command in ("confirm", "report"):
        parser.add_argument("--out-dir", type=Path, default=Path("experiments/results"),
                            help="where tuning_benchmark.{json,md} are written (confirm) and read (report)")
    if command == "confirm":
        parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates of each interval")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: tune=<name>, tune.<key>=..., or any training key")
    return parser


def _gpus(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    if text.strip().lower() in ("", "cpu", "none"):
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mask_console()  # storage and tracking URLs may carry passwords; so may any library's message
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    args = _parser(command).parse_intermixed_args(argv)
    label = f"worker {args.index}" if command == "worker" else command
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{label}] %(name)s: %(message)s")
    if command == "trial":
        return child_main(args.spec, args.relay, args.parent_pid, int(args.parent_started) if args.parent_started else None)
    # A report reads whichever default storage exists; a worker belongs to a launcher of several.
    workers = {"run": getattr(args, "workers", 1), "worker": 2, "report": None, "confirm": None}[command]
    from hydra.errors import HydraException

    try:
        setup = prepare(args.overrides, workers, args.storage)
    except (HydraException, ValueError) as error:  # a bad override or value: one line, not a traceback
        return user_error_status("ssod-tune", error)
    # The study's own MLflow calls (its parent run, marking trials) wait no longer on a tracking
    # server that went away than a trial's training does (tracking.request_* of the base config).
    bound_requests(*setup.request_bounds)
    log.info(
        "study %s: storage %s, MLflow %s, trials in %s",
        setup.tune.study_name, mask_secrets(setup.storage_url), mask_secrets(setup.tracking_uri), setup.study_dir,
    )
    if command == "worker":
        try:
            run_worker(setup, args.index)
        except StorageUnavailable as error:  # its launcher restarts it (tune.max_worker_restarts)
            log.error("%s", error)
            return 1
        return 0
    named = any(o.lstrip("+").startswith(("tune=", "tune.study_name=")) for o in args.overrides)
    if command == "report":
        try:
            summary = report(setup, named)
        except StudyNotFound as error:
            log.error("%s", error)
            return 2
        confirmation = args.out_dir / "tuning_benchmark.json"
        if confirmation.is_file() and json.loads(confirmation.read_text()).get("study") == setup.tune.study_name:
            summary["confirmation"] = json.loads(confirmation.read_text())["summary"]
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if command == "confirm":
        try:
            study = load_existing(setup, named)
            document = confirm(setup, study, args.out_dir, args.replicates)
        except (StudyNotFound, LookupError) as error:
            log.error("%s", error)
            return 2
        print(markdown(document))
        return 0
    return launch(setup, args.workers, _gpus(args.gpus))


if __name__ == "__main__":
    sys.exit(main())
