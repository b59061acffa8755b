"""Where a study lives, how dead workers' trials come back, and the budget all workers share.

Storages (``resolve_storage_url``):

- ``sqlite:///<abs>/optuna.db`` (default for one worker), or any SQLAlchemy URL such as
  ``postgresql+psycopg2://user:pw@host/optuna`` for many machines: ``RDBStorage`` with a
  heartbeat, so a trial whose worker stopped beating for ``grace_period`` s becomes FAIL
  and is re-queued with the same parameters (``RetryHeartbeatStaleTrialCallback``).
- ``journal:<path>`` or a path ending in ``.journal`` (default for several local workers):
  ``JournalStorage`` over a file with locks, no SQLite write contention. It has no
  heartbeat, so ``reap_dead_workers`` fails and re-queues the trials of local workers whose
  process is gone (each trial records its worker's host, PID namespace, PID and PID start
  time, so a reused PID is not mistaken for the worker).

The storage is never the MLflow database: MLflow and Optuna both keep an Alembic
``alembic_version`` table, so ``check_not_mlflow`` refuses the same database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from ssod.masking import mask_secrets
from ssod.tuning.processes import machine_id, process_alive, start_ticks

log = logging.getLogger(__name__)

STORAGE_ENV = "SSOD_OPTUNA_STORAGE"
# Set by the launcher for its workers, so they open exactly the storage it resolved.
RESOLVED_ENV = "_SSOD_TUNE_STORAGE"
OWNER_ATTR = "worker"
SURPLUS_ATTR = "surplus"
INTERRUPTED_ATTR = "interrupted"  # stopped on request, not failed (see ssod.tuning.workers.StaleTrials)
ENQUEUED_ATTR = "ssod.enqueued"  # a trial of tune.enqueue: its name (default, paper, ...)
INTERRUPTED_TRIALS = "interrupted_trials"  # system attribute: the stopped trials of a retry chain



@contextlib.contextmanager
def quiet_experimental():
    """Heartbeats, retries and multivariate TPE are marked experimental; say it once, here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def resolve_storage_url(configured: str, project_dir: Path, workers: Optional[int]) -> str:
    """``configured`` (``--storage`` or ``tune.storage``), else ``$SSOD_OPTUNA_STORAGE``, else
    ``<project>/optuna.db`` for one worker and ``<project>/optuna.journal`` for several
    (``workers=None``: the journal only if it exists and ``optuna.db`` does not)."""
    url = os.environ.get(RESOLVED_ENV) or configured or os.environ.get(STORAGE_ENV, "")
    if not url:
        database, journal = project_dir / "optuna.db", project_dir / "optuna.journal"
        several = journal.exists() and not database.exists() if workers is None else workers > 1
        return f"journal:{journal}" if several else f"sqlite:///{database}"
    if is_journal(url):
        path = Path(url.removeprefix("journal:")).expanduser()
        return f"journal:{path if path.is_absolute() else project_dir / path}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return f"sqlite:///{project_dir / url[len('sqlite:///'):]}"  # never relative to a moving cwd
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the stack ships psycopg2.
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".journal")


def _database_identity(url: str) -> Optional[tuple]:
    """A comparable (kind, location) of a storage or tracking URI; None for non-databases."""
    if is_journal(url):
        return ("file", str(Path(url.removeprefix("journal:")).resolve()))
    if "://" not in url or url.startswith(("http://", "https://", "file:", "databricks")):
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return ("file", str(Path(parsed.database or ":memory:").resolve()))
    return (parsed.get_backend_name(), parsed.host, parsed.port, parsed.database)


def check_not_mlflow(storage_url: str, tracking_uri: str) -> None:
    """Refuse an Optuna storage that is the MLflow store's database (Alembic tables collide)."""
    storage, tracking = _database_identity(storage_url), _database_identity(tracking_uri)
    if storage_url == tracking_uri or (storage is not None and storage == tracking):
        raise ValueError(
            f"the Optuna storage {mask_secrets(storage_url)} is the MLflow tracking store; "
            "use another database (e.g. optuna.db or PostgreSQL database 'optuna')"
        )


class StorageUnavailable(RuntimeError):
    """The study's database did not answer for ``tune.storage_outage_s``."""


def _transient(error: BaseException) -> bool:
    """A database that went away or is busy (connection refused or cut, a restart, SQLite's
    lock), anywhere in the chain of causes; not a refused statement (integrity, bad data)."""
    from sqlalchemy import exc

    seen, depth = error, 0
    while seen is not None and depth < 10:
        if isinstance(seen, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)):
            return True
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return False


class PatientRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose every call rides out a database outage of up to ``outage_s``:
    a call that fails because the server went away is tried again (backoff 0.5 s doubling to
    10 s) until it answers or ``outage_s`` has passed since the first failure, then raises
    ``StorageUnavailable`` in one line. Without it, Optuna ends a worker within a second of a
    PostgreSQL restart, leaving its trial RUNNING (an ``UnboundLocalError`` from deep in
    ``study.optimize``), and a launcher burns its worker restarts in seconds. The heartbeat
    thread goes through the same calls."""

    def __init__(self, url: str, *args, outage_s: float = 120.0, **kwargs) -> None:
        self.outage_s = outage_s
        # Set once the storage gave up: every later call fails at once (the worker is ending;
        # Optuna's own clean-up calls must not wait out the outage again, once each).
        self.unavailable: Optional[StorageUnavailable] = None
        self.url = url  # for the messages of a failed first connection
        self._patiently("connecting", super().__init__, url, *args, **kwargs)

    def _patiently(self, name: str, call: Callable, *args, **kwargs):
        if self.unavailable is not None:
            raise StorageUnavailable(str(self.unavailable))
        first_failure, delay = None, 0.5
        while True:
            try:
                result = call(*args, **kwargs)
            except Exception as error:
                if not _transient(error):
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    log.warning("Optuna storage %s: %s failed (%s); retrying for up to %.0f s (tune.storage_outage_s)",
                                mask_secrets(str(self.url)), name, _first_line(error), self.outage_s)
                left = first_failure + self.outage_s - now
                if left <= 0:
                    self.unavailable = StorageUnavailable(
                        f"the Optuna storage {mask_secrets(str(self.url))} did not answer for {self.outage_s:.0f} s "
                        f"(tune.storage_outage_s): {_first_line(error)}")
                    raise self.unavailable from None
                time.sleep(min(delay, left))
                delay = min(2 * delay, 10.0)
                continue
            if first_failure is not None:
                log.warning("Optuna storage answers again after %.0f s (%s)", time.monotonic() - first_failure, name)
            return result


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause (the driver's "connection refused", not
    Optuna's generic wrapper about invalid data)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = mask_secrets(str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _patient(name: str):
    original = getattr(optuna.storages.RDBStorage, name)

    def method(self, *args, **kwargs):
        return self._patiently(name, original.__get__(self), *args, **kwargs)

    method.__name__, method.__qualname__, method.__doc__ = name, f"PatientRDBStorage.{name}", original.__doc__
    return method


# Every call that reads or writes the database (what Optuna's study, trials and heartbeat use).
_NOT_DATABASE = {"get_heartbeat_interval", "get_failed_trial_callback", "remove_session", "upgrade",
                 "get_current_version", "get_head_version", "get_all_versions"}
for _name, _value in vars(optuna.storages.RDBStorage).items():
    if callable(_value) and (not _name.startswith("_") or _name == "_get_stale_trial_ids") and _name not in _NOT_DATABASE:
        setattr(PatientRDBStorage, _name, _patient(_name))


def _heartbeat_or_nothing(self, trial_id: int) -> None:
    """The heartbeat thread's call: once the storage gave up, a beat that cannot be recorded is
    dropped in silence (the worker's main thread says why it stops; a missing beat is what
    marks the trial stale for the others)."""
    try:
        self._patiently("record_heartbeat", optuna.storages.RDBStorage.record_heartbeat.__get__(self), trial_id)
    except StorageUnavailable:
        pass


PatientRDBStorage.record_heartbeat = _heartbeat_or_nothing


def open_storage(url: str, heartbeat_interval: int, grace_period: int, on_stale: Callable,
                 outage_s: float = 120.0) -> optuna.storages.BaseStorage:
    """A journal file storage, or an RDB storage that re-queues stale trials via ``on_stale``
    and rides out a database outage of up to ``outage_s`` (``PatientRDBStorage``)."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # The heartbeat thread writes while the trial writes: wait for the lock, don't fail.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with quiet_experimental():
        return PatientRDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
            outage_s=outage_s,
        )


def storage_gave_up(study: optuna.Study) -> Optional[StorageUnavailable]:
    """The ``StorageUnavailable`` of the study's storage, if it gave up (Optuna wraps an RDB
    storage in a cache: the storage is its backend)."""
    storage = getattr(study._storage, "_backend", study._storage)
    return getattr(storage, "unavailable", None)


# --------------------------------------------------------------------------- dead workers


def owner_record(trial_number: int) -> dict:
    pid = os.getpid()
    return {"machine": machine_id(), "pid": pid, "started": start_ticks(pid), "trial": trial_number}


def reap_dead_workers(study: optuna.Study, on_stale: Callable, unclaimed_grace_s: Optional[float]) -> list[int]:
    """Fail RUNNING trials whose local worker process is gone and hand each to ``on_stale``.

    A trial not yet claimed by its worker (popped, owner not written yet) counts as dead
    after ``unclaimed_grace_s``; None leaves those to the heartbeat, as it does trials of
    other machines.
    """
    here = machine_id()
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR) or {}
        if owner.get("trial") == trial.number:
            if owner.get("machine") != here or process_alive(owner["pid"], owner.get("started")):
                continue
        elif unclaimed_grace_s is None or trial.datetime_start is None:
            continue
        elif time.time() - trial.datetime_start.timestamp() < unclaimed_grace_s:
            continue
        try:
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker reaped it first
        log.warning("trial %d: its worker (pid %s) is gone; marked FAIL", trial.number, owner.get("pid", "?"))
        on_stale(study, failed)
        reaped.append(trial.number)
    return reaped


# --------------------------------------------------------------------------- budget


@dataclass
class Usage:
    """Trials that count against ``tune.n_trials``, and what is still open."""

    used: int
    running: int
    waiting: int
    complete: int
    pruned: int
    failed: int

    def spent(self, n_trials: int) -> bool:
        """The whole budget has run: nothing running or queued any more."""
        return self.used >= n_trials and self.running == 0 and self.waiting == 0


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Every trial, except surplus ones and failed ones whose retry carries their slot."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [
        t for t in trials
        if not t.user_attrs.get(SURPLUS_ATTR) and not (t.state == TrialState.FAIL and t.number in retried)
    ]


def usage(study: optuna.Study) -> Usage:
    counted = _counted(study.get_trials(deepcopy=False))
    by_state = {state: sum(t.state == state for t in counted) for state in TrialState}
    return Usage(
        used=len(counted),
        running=by_state[TrialState.RUNNING],
        waiting=by_state[TrialState.WAITING],
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL],
    )


def within_budget(study: optuna.Study, trial_number: int, n_trials: int) -> bool:
    """Whether fewer than ``n_trials`` counted trials precede ``trial_number``.

    Two workers may create trials at the same moment; the later number loses, so the
    study never runs more than ``n_trials`` trials that count.
    """
    counted = _counted(study.get_trials(deepcopy=False))
    return sum(t.number < trial_number for t in counted) < n_trials

