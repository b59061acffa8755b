"""Where a run's files go and what it is called: a folder of its own for every new run, the
earlier folder for ``train.resume``, and an MLflow run name that tells runs apart.

With ``train.output_dir`` unset (the default), a new run gets
``outputs/<method>-<data>/<YYYY-MM-DD_HH-MM-SS>`` (``-2``, ``-3`` ... when two start in the
same second), and ``outputs/<method>-<data>/latest`` points at the newest that started. A job of a Hydra
multirun gets Hydra's job folder, ``outputs/multirun/<time>/<job number>``.
``train.resume=auto`` continues the newest folder of the group whose run had the same
config (what a resume may change, such as ``train.iterations``, aside) and starts a new
folder when there is none; ``train.resume=<checkpoint>`` continues in that checkpoint's
folder. A given ``train.output_dir`` is used as it is.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from ssod.checkpoint import checkpoint_file, list_checkpoints
from ssod.config import flatten
from ssod.masking import mask_secrets

log = logging.getLogger(__name__)

# A new run's group folder, under the project directory.
OUTPUTS = "outputs"
LATEST = "latest"
# Settings a resume may change without making it another run, and how a run is placed,
# named and tracked: ignored when ``train.resume=auto`` looks for the run to continue.
RESUMABLE = (
    "train.resume", "train.output_dir", "train.run_name", "train.init_from", "train.iterations", "train.log_every",
    "train.eval_every", "train.ckpt_every", "train.keep_checkpoints", "train.progress", "train.num_vis_images",
    "data.num_workers", "data.eval_num_workers", "tracking.",
)
# Overrides already in the run's name, or about where and how it runs and reports, not what
# it trains: left out of the name.
_UNNAMED = ("method", "data", "experiment", "data.percent", "data.fold", "train.seed", "train.resume",
            "train.output_dir", "train.run_name", "train.progress", "train.log_every", "train.eval_every",
            "train.ckpt_every", "train.keep_checkpoints", "train.num_vis_images", "data.cache_dir",
            "data.num_workers", "data.eval_num_workers", "tracking", "hydra")
_UNNAMED_GROUPS = ("tracking.", "hydra.")
# MLflow keeps run names up to this length.
_NAME_LIMIT = 250


@dataclass(frozen=True)
class HydraJob:
    """What Hydra's app knows about the job (absent outside it: the tuner, the library)."""

    multirun: bool
    output_dir: Path
    overrides: tuple[str, ...]
    hydra_yaml: str
    sweep_dir: Optional[Path] = None  # a multirun's folder (hydra.sweep.dir)

    @classmethod
    def current(cls) -> Optional["HydraJob"]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra = HydraConfig.get()
        multirun = hydra.mode == RunMode.MULTIRUN
        return cls(multirun=multirun, output_dir=Path(hydra.runtime.output_dir),
                   overrides=tuple(hydra.overrides.task), hydra_yaml=OmegaConf.to_yaml(HydraConfig.instance().cfg),
                   sweep_dir=Path(hydra.sweep.dir).absolute() if multirun else None)


def run_name(cfg: DictConfig, job: Optional[HydraJob]) -> str:
    """``train.run_name`` when set; else, short, what tells the run apart: method, data (when
    not the synthetic set), labeled percent (and fold, when not 1) when the labeled set is
    split off by percent, seed, and the command line's overrides that change what it trains,
    each as its last key and value (a path as its file name), e.g. ``polish_teacher 10% seed0
    unsup_weight=2``. Where it runs and how it reports (folders, intervals, tracking) is left out."""
    if cfg.train.run_name:
        return str(cfg.train.run_name)
    data = cfg.data
    parts = [str(cfg.method.name)]
    if data.name != "synthetic":
        parts.append(str(data.name))
    if not data.unlabeled_json and data.percent < 100:
        parts.append(f"{data.percent:g}%" + (f" fold{data.fold}" if data.fold != 1 else ""))
    parts.append(f"seed{cfg.train.seed}")
    parts += [_short(override) for override in (job.overrides if job else ())
              if _key(override) not in _UNNAMED and not _key(override).startswith(_UNNAMED_GROUPS)]
    name = mask_secrets(" ".join(parts))
    return name if len(name) <= _NAME_LIMIT else name[: _NAME_LIMIT - 3] + "..."


def launch_command(job: Optional[HydraJob]) -> Optional[str]:
    """The command that started the run: under a launcher (``accelerate launch``, ``torchrun``)
    the launcher's command line, else ``ssod-train`` and the overrides (None outside Hydra's app)."""
    if "LOCAL_RANK" in os.environ:  # set by the launchers for the processes they start
        line = _launcher_line()
        if line:
            return mask_secrets(line)
    return None if job is None else "ssod-train " + mask_secrets(" ".join(job.overrides))


def _launcher_line() -> str:
    """The nearest parent process that is ``accelerate`` or ``torchrun`` (or ``python -m
    torch.distributed.run``), as a shell line without the interpreter's path."""
    import psutil

    try:
        for process in psutil.Process().parents()[:3]:
            argv = process.cmdline()
            for index, arg in enumerate(argv[:4]):
                if Path(arg).name in ("accelerate", "torchrun"):
                    return shlex.join([Path(arg).name, *argv[index + 1:]])
                if arg in ("torch.distributed.run", "torch.distributed.launch") and argv[index - 1] == "-m":
                    return shlex.join(["python", "-m", arg, *argv[index + 1:]])
    except (psutil.Error, OSError):
        pass
    return ""


def short_params(cfg: DictConfig) -> dict[str, str]:
    """The params ``ssod.mlflow_view.SHORT_PARAMS``: method, labeled percent (``given`` for a
    labeled set given as files), seed; short names, for the runs table's columns."""
    data = cfg.data
    percent = f"{data.percent:g}" if not data.unlabeled_json and data.percent < 100 else "given"
    return {"method": str(cfg.method.name), "percent": percent, "seed": str(cfg.train.seed)}


def _short(override: str) -> str:
    """``method.unsup_weight=2`` -> ``unsup_weight=2``; ``train.init_from=a/b/c.pt`` -> ``init_from=c.pt``."""
    key, _, value = override.partition("=")
    if "/" in value.rstrip("/"):
        value = Path(value.rstrip("/")).name
    return f"{key.lstrip('~+').rsplit('.', 1)[-1]}={value}"


def run_description(cfg: DictConfig, title: str, oracle: bool, command: Optional[str], processes: int = 1) -> str:
    """What the run is, for its MLflow page (markdown): method, data, model, schedule, how
    many processes train it, where its files are and the command that started it."""
    data, method, train = cfg.data, cfg.method, cfg.train
    labeled = (f"{data.percent:g}% labeled (fold {data.fold})" if not data.unlabeled_json and data.percent < 100
               else "labeled set as given")
    schedule = f"{train.iterations} iterations"
    if method.name != "supervised":
        schedule += (f": {method.unsup_start} supervised (burn-in), then unsupervised weight {method.unsup_weight:g}"
                     + (f" ramped over {method.unsup_warmup}" if method.unsup_warmup else ""))
    lines = [f"**{title}** on `{data.name}`, {labeled}, seed {train.seed}; model `{cfg.model.arch}`; {schedule}."]
    if processes > 1:
        lines.append(f"{processes} processes: global batch {processes * train.batch_labeled} labeled + "
                     f"{processes * train.batch_unlabeled} unlabeled images ({train.batch_labeled} + "
                     f"{train.batch_unlabeled} per process); gradients averaged over all, learning rate "
                     f"{train.lr:g} as configured (not scaled with the number of processes).")
    lines += ["", f"Output folder: `{train.output_dir}`."]
    if command:
        lines.append(f"Command: `{command}`.")
    if oracle:
        lines += ["", "**Oracle**: the pseudo labels are the unlabeled images' hidden ground truth. "
                      "A diagnostic of the unsupervised path, not a result."]
    return "\n".join(lines)


def _key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("~+")


def group_name(cfg: DictConfig) -> str:
    """The folder under ``outputs/`` that holds a kind of run's folders: ``train.run_name``
    when set, else ``<method>-<data>``; made safe as a file name."""
    name = str(cfg.train.run_name or f"{cfg.method.name}-{cfg.data.name}")
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._") or "run"


def place_run(cfg: DictConfig, project_dir: Path, job: Optional[HydraJob]) -> Path:
    """The run's output folder (absolute; created when new). See the module's docstring."""
    train = cfg.train
    if train.output_dir:
        path = Path(train.output_dir).expanduser()
        return path if path.is_absolute() else project_dir / path
    if train.resume and train.resume != "auto":
        checkpoint = checkpoint_file(train.resume, "train.resume").resolve()  # not through `latest`
        if checkpoint.parent.name == "checkpoints":
            return checkpoint.parent.parent
        log.info("train.resume=%s is not in a run's checkpoints folder: continuing in a new folder", train.resume)
    if job is not None and job.multirun:
        folder = job.output_dir if job.output_dir.is_absolute() else project_dir / job.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    group = project_dir / OUTPUTS / group_name(cfg)
    if train.resume == "auto":
        if list_checkpoints(group / "checkpoints"):
            # A run of the layout before folders of their own (outputs/<method>-<data>/checkpoints).
            log.info("train.resume=auto: continuing %s (a run started before runs had folders of their own)", group)
            return group
        earlier = _earlier_run(group, cfg)
        if earlier is not None:
            log.info("train.resume=auto: continuing %s", earlier)
            return earlier
    return _new_folder(group)


def _earlier_run(group: Path, cfg: DictConfig) -> Optional[Path]:
    """The newest folder of ``group`` with checkpoints of a run of the same config, or None.
    When the newest run with checkpoints differs, the log says what differs."""
    wanted = _comparable(_masked(flatten(cfg)))  # as config.yaml has it: passwords masked
    folders = [p for p in group.glob("*") if p.is_dir() and not p.is_symlink()] if group.is_dir() else []
    told = False
    for folder in sorted(folders, key=_start_order, reverse=True):
        if not list_checkpoints(folder / "checkpoints"):
            continue
        saved = _saved_config(folder)
        if saved == wanted:
            return folder
        if not told:
            differs = (["its config.yaml is unreadable"] if saved is None else
                       sorted(key for key in wanted.keys() | saved.keys() if wanted.get(key) != saved.get(key)))
            log.info("train.resume=auto: %s is a run of another config (%s); not continued (train.output_dir=%s "
                     "train.resume=auto continues it with this one)", folder, ", ".join(differs[:5]), folder)
            told = True
    return None


def _saved_config(folder: Path) -> Optional[dict]:
    """The comparable part of the config a run wrote into its folder, or None."""
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return _comparable(flatten(saved)) if isinstance(saved, dict) else None


def _masked(flat: dict) -> dict:
    return {key: mask_secrets(value) if isinstance(value, str) else value for key, value in flat.items()}


def _start_order(folder: Path) -> tuple[str, int]:
    """``2026-01-02_03-04-05-2`` -> (``2026-01-02_03-04-05``, 2): the second run of that second
    after the first, and ``-10`` after ``-9`` (other names sort by name, as number 0)."""
    match = re.fullmatch(r"(.+?)-(\d{1,3})", folder.name)
    if match and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", match.group(1)):
        return match.group(1), int(match.group(2))
    return folder.name, 1 if re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", folder.name) else 0


def _comparable(flat: dict) -> dict:
    return {key: value for key, value in flat.items() if not key.startswith(RESUMABLE)}


def _new_folder(group: Path) -> Path:
    """A folder named after the time that no other run has: created here, atomically."""
    group.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for number in range(1, 1000):
        folder = group / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{group}: 999 runs started in the second {stamp}")


def point_latest(folder: Path) -> None:
    """``<group>/latest`` -> ``folder``, a run that has started (replaced atomically; best
    effort), for a run in a folder of its own (``outputs/<group>/<start time>``)."""
    group = folder.parent
    if group.parent.name != OUTPUTS or group.name == "multirun" or not _start_order(folder)[1]:
        return
    temporary = group / f".{LATEST}-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(folder.name, target_is_directory=True)
        os.replace(temporary, group / LATEST)
    except OSError as error:  # e.g. a file system without symlinks
        log.debug("could not point %s at %s: %s", group / LATEST, folder, error)


def write_hydra_files(folder: Path, cfg: DictConfig, job: HydraJob) -> None:
    """Hydra's record of the job, where Hydra would keep it: ``<folder>/.hydra/`` with the
    composed ``config.yaml`` (as given, before interpolation), ``hydra.yaml`` and
    ``overrides.yaml``; passwords in URIs masked. A resume keeps the first record (its own
    command is in the console log and MLflow's ``resumes/``)."""
    hydra_dir = folder / ".hydra"
    if (hydra_dir / "overrides.yaml").is_file():
        return  # a resumed run: the record of the command that started it stays
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(mask_secrets(OmegaConf.to_yaml(cfg)))
    (hydra_dir / "hydra.yaml").write_text(mask_secrets(job.hydra_yaml))
    (hydra_dir / "overrides.yaml").write_text(mask_secrets(yaml.safe_dump(list(job.overrides))))
