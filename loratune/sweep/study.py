"""Where a sweep's study lives and which of its trials count.

Embedded (the default): SQLite in the sweep folder, one worker at a time (a lock file), so a trial still RUNNING
when a worker starts was left by one that was killed. Shared (`--storage URL`): several workers; each records a
heartbeat for its running trial, and a trial without one for GRACE_SECONDS is failed by whichever worker looks.
A sweep has N trials when N are complete or pruned: failed trials are redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..core.errors import UserError, first_line

HEARTBEAT_SECONDS = 3
GRACE_SECONDS = 15  # five missed heartbeats: a live worker records one between polls of its trial
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDY_FILE = "study.db"
LOCK_FILE = ".lock"

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours to print
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# ask and tell with heartbeats is what a worker that trains in a child process needs; Optuna warns it is unusual
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


@dataclass(frozen=True)
class Settings:
    """What a sweep was started with, kept in the study so that `--name` continues it on any machine."""

    config_file: str  # absolute path: each trial runs `loratune train CONFIG_FILE ...`
    config: dict  # the resolved config (without output_dir): the file must still say this
    space: dict
    trials: int
    pruner: str

    def changes(self, other: Settings) -> list[str]:
        """What differs in config and space (the trial count and pruner may change on continuing)."""
        return config_changes(self.config, other.config) + (["the space"] if self.space != other.space else [])


def config_changes(old: dict, new: dict) -> list[str]:
    """The settings of `old` that `new` gives otherwise (a setting added to loratune since has its default)."""
    return [f"{k}: {v!r} -> {new.get(k)!r}" for k, v in old.items() if new.get(k) != v]


def storage_url(folder: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{folder.resolve() / STUDY_FILE}"


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def with_driver(url: str) -> str:
    """postgresql:// with the psycopg2 driver when psycopg (SQLAlchemy 2.1's default for it) is not installed."""
    missing = importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None
    return (
        "postgresql+psycopg2://" + url.removeprefix("postgresql://")
        if url.startswith("postgresql://") and missing
        else url
    )


def open_storage(url: str, shared: bool) -> optuna.storages.RDBStorage:
    """Connect (creating Optuna's tables when new), or one line saying why not."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    heartbeat = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS} if shared else {}
    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine, **heartbeat)
        except (SQLAlchemyError, ImportError, RuntimeError, ValueError) as e:
            # workers started together on a new database race to create Optuna's tables ("already exists"): the
            # loser finds them made on its next try
            if isinstance(e, IntegrityError | ProgrammingError) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise UserError(f"--storage {shown_url(url)}: cannot open the study there ({first_line(e)})") from None


def stored_settings(storage, name: str) -> Settings | None:
    if name not in optuna.study.get_all_study_names(storage):
        return None
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    return Settings(**attrs["settings"]) if "settings" in attrs else None


def open_study(storage, name: str, settings: Settings, seed: int | None) -> optuna.Study:
    """The study (created when new) with its pruner, and a sampler seeded with `seed` plus the trials so far (a
    continued sweep does not repeat its first suggestions); unseeded when None (shared: workers must differ)."""
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2)  # a median needs a few whole trials to mean anything
        if settings.pruner == "median"
        else optuna.pruners.SuccessiveHalvingPruner()
    )
    study = optuna.create_study(
        storage=storage, study_name=name, direction="minimize", load_if_exists=True, pruner=pruner
    )
    study.sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials))
    study.set_user_attr("settings", asdict(settings))
    return study


@contextlib.contextmanager
def locked(folder: Path, name: str):
    """One embedded worker at a time; the kernel drops the lock however the process ends."""
    with open(folder / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"sweep {name}: another worker runs it on this machine; its study is a SQLite file, one worker at "
                "a time (several workers share a study with --storage postgresql://...)"
            ) from None
        yield


def fail_lost(study: optuna.Study, shared: bool) -> list[int]:
    """Mark failed the trials whose worker is gone, and return their numbers. Embedded: every RUNNING trial (the
    lock says no other worker is alive); shared: those without a heartbeat for GRACE_SECONDS."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if shared:
        optuna.storages.fail_stale_trials(study)
    else:
        for number in running:
            study.tell(number, state=TrialState.FAIL)
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running)


def counts(study: optuna.Study) -> tuple[int, int]:
    """(trials complete or pruned, trials running)."""
    trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    finished = sum(t.state in COUNTED for t in trials)
    return finished, len(trials) - finished


def heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> None:
    """Record that this worker still trains `trial` (shared storage only; Optuna's ask and tell record none)."""
    if storage.get_heartbeat_interval():
        storage.record_heartbeat(trial._trial_id)


def claim(study: optuna.Study, storage: optuna.storages.RDBStorage, total: int):
    """A new trial, or None when other workers took the last ones meanwhile (the surplus trial is failed at once,
    untrained, and left out of the results)."""
    trial = study.ask()
    heartbeat(storage, trial)  # at once: a trial that never had a heartbeat is never found stale
    ahead = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    if sum(t.number < trial.number for t in ahead) >= total:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial
