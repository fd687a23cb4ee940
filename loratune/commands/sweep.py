"""`loratune sweep`: search a config's hyperparameters with Optuna. Each trial is an ordinary run folder,
runs/sweep-NAME/trial-007/, trained by `loratune train` in a child process; the sweep folder holds the study
(SQLite, unless --storage names a shared database), best.yaml and val_loss.png. docs/sweep.md explains it."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import time
from pathlib import Path

from ..core.config import TrainConfig
from ..core.errors import UserError

DEFAULT_TRIALS = 10
MAX_FAILURES_IN_A_ROW = 3  # a failure that repeats (a bad config, no memory) would otherwise never end


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="search hyperparameters: trials of a config, pruned on validation loss (Optuna)"
    )
    p.add_argument(
        "config", nargs="?", help="YAML file of settings every trial starts from (leave out with --name to continue)"
    )
    p.add_argument(
        "--trials",
        type=_positive_int,
        metavar="N",
        help=f"trials to finish, pruned ones included; failed ones are redone (default: {DEFAULT_TRIALS}, or the "
        "sweep's own when continuing)",
    )
    p.add_argument(
        "--space",
        metavar="guide|FILE",
        help="what to search: guide (the Training Guide's ranges of learning_rate, lora_r, lora_alpha, warmup_ratio "
        "and lora_dropout; the default) or a YAML file of setting: {low, high, log} or {choices}",
    )
    p.add_argument(
        "--name",
        help="the sweep: its folder runs/sweep-NAME and its study (default: the config file's name); "
        "`loratune sweep --name NAME` continues it",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="a database several workers share the study in, e.g. postgresql://user:pw@host/db "
        "(default: SQLite in the sweep folder, one worker)",
    )
    p.add_argument(
        "--pruner",
        choices=["median", "halving"],
        help="stop a trial early when its validation loss is worse than the median of earlier trials at the same "
        "step, or by successive halving (default: median)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the space and the cost estimate only; train and write nothing"
    )
    p.set_defaults(func=run_sweep_command)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number above 0")
    return value


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..sweep import study as st
    from ..sweep.space import parse_space

    name = args.name or (Path(args.config).stem if args.config else None)
    if name is None:
        raise UserError("sweep: give a config file to start a sweep, or --name NAME to continue one")
    if not re.fullmatch(r"[\w.-]+", name):
        raise UserError(f"--name {name!r}: letters, digits, '.', '-' and '_' only (it names a folder)")
    folder = Path("runs") / f"sweep-{name}"
    shared = args.storage is not None
    url = st.storage_url(folder, args.storage)
    existing = shared or (folder / st.STUDY_FILE).is_file()
    # a dry run of a config touches no study (opening a new one creates its tables)
    storage = st.open_storage(url, shared) if existing and not (args.dry_run and args.config) else None
    settings = _settings(args, name, storage and st.stored_settings(storage, name))
    base = _base_config(settings)
    space = parse_space(settings.space, base, "the sweep's space")
    print("searching: " + "; ".join(d.text() for d in space.dims))
    for line in _cost(base, space, settings, folder):
        print(line)
    if args.dry_run:
        print("dry run: nothing trained or written")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _as_interrupt)  # a kill stops the trial as Ctrl-C does
    try:
        with contextlib.nullcontext() if shared else st.locked(folder, name):
            storage = storage or st.open_storage(url, shared)
            study = st.open_study(storage, name, settings, None if shared else base.seed)
            print(f"sweep {name}: {folder}, study in {st.shown_url(url)}")
            _work(study, storage, settings, base, space, folder, shared)
    except KeyboardInterrupt:
        raise UserError(
            f"sweep {name}: a trial that was running stopped with a checkpoint in its folder and counts as failed; "
            f"`loratune sweep --name {name}` continues the sweep",
            exit_code=130,
            label="stopped",
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _finish(study, folder, name)
    return 0


def _as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _settings(args, name: str, stored):
    """The sweep's settings: from the command line for a new sweep, else the study's, checked against what the
    command line gives again (the trial count and pruner may change)."""
    from ..core.sources import resolve
    from ..sweep.space import load_space
    from ..sweep.study import Settings

    if stored is None and not args.config:
        raise UserError(f"--name {name}: no such sweep (runs/sweep-{name} holds no study); start one with a config")
    given = None
    if args.config:
        cfg = resolve(args.config).config
        space = load_space(args.space or "guide", cfg).to_json()
        trials = args.trials or (stored.trials if stored else DEFAULT_TRIALS)
        given = Settings(str(Path(args.config).resolve()), _config_dict(cfg), space, trials, args.pruner or "median")
    if stored is None:
        return given
    if given is not None and (changes := stored.changes(given)):
        raise UserError(
            f"sweep {name} was started with another config or space ({'; '.join(changes)[:300]}): continue it with "
            f"`loratune sweep --name {name}`, or start a new one with another --name"
        )
    if args.space and given is None:
        raise UserError(f"--space: sweep {name} keeps the space it started with; give --name alone to continue it")
    return Settings(
        given.config_file if given else stored.config_file,
        stored.config,
        stored.space,
        args.trials or stored.trials,
        args.pruner or stored.pruner,
    )


def _config_dict(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k != "output_dir"}


def _base_config(settings) -> TrainConfig:
    """The config every trial starts from, read again from its file: refused when the file says something else
    now (the trials would not be comparable)."""
    from ..core.sources import resolve
    from ..sweep.study import config_changes

    cfg = resolve(settings.config_file).config
    changed = config_changes(settings.config, _config_dict(cfg))
    if changed:
        raise UserError(
            f"config file {settings.config_file} changed since the sweep started ({'; '.join(changed)[:300]}): "
            "put it back, or start a new sweep with another --name"
        )
    return cfg


def _work(study, storage, settings, base: TrainConfig, space, folder: Path, shared: bool) -> None:
    """Train trials until the study has `settings.trials` complete or pruned ones (with other workers, when the
    last ones run elsewhere: wait, and take over one whose worker dies)."""
    from optuna.trial import TrialState

    from ..sweep import study as st
    from ..sweep.results import progress, shown, trial_name
    from ..sweep.space import suggest
    from ..sweep.trial import run_trial

    failures = 0
    while True:
        for number in st.fail_lost(study, shared):
            print(f"{trial_name(number)}: left running by a worker that was stopped or killed: marked failed")
        finished, running = st.counts(study)
        if finished >= settings.trials:
            return
        if finished + running >= settings.trials:
            time.sleep(st.HEARTBEAT_SECONDS)
            continue
        trial = st.claim(study, storage, settings.trials)
        if trial is None:
            continue
        values = suggest(trial, space, base)
        name = trial_name(trial.number)
        print(
            f"trial {finished + 1} of {settings.trials}: {name}: "
            + ", ".join(f"{k} {shown(v)}" for k, v in values.items())
        )
        outcome = run_trial(
            study, storage, trial, settings.config_file, values, folder / name, folder / "logs" / f"{name}.log"
        )
        result = f"best val loss {outcome.value:.4f}" if outcome.value is not None else outcome.state.name.lower()
        detail = f" ({outcome.message})" if outcome.message and outcome.message != "pruned" else ""
        steps = f"{outcome.steps}/{outcome.full_steps}" if outcome.full_steps else str(outcome.steps)
        print(f"{name}: {result}{detail}, {steps} steps in {outcome.seconds:.0f}s; {progress(study, settings.trials)}")
        failures = failures + 1 if outcome.state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise UserError(f"{failures} trials in a row failed; the last: {outcome.message}")


def _finish(study, folder: Path, name: str) -> None:
    from ..sweep import results

    trials = results.results_trials(study)
    print(results.table(trials))
    best = results.best_trial(study)
    if best is not None:
        values = ", ".join(f"{k} {results.shown(v)}" for k, v in best.user_attrs.get("values", {}).items())
        print(f"best: {results.trial_name(best.number)}, best validation loss {best.value:.4f}: {values}")
    for line in (results.importances(study), results.saving(trials)):
        if line:
            print(line)
    plot = results.plot(trials, folder, name)
    if plot:
        print(f"wrote {plot}")
    best_file = results.write_best(study, folder, name)
    if best_file:
        print(f"wrote {best_file}: `loratune train {best_file}` trains the best trial again")


# --- The cost, from loratune's planner -------------------------------------------------------------------------


def _cost(base: TrainConfig, space, settings, folder: Path) -> list[str]:
    """Peak memory and time per trial at the space's largest values (commands.plan), and the sweep's total with
    and without pruning."""
    from ..core.console import format_seconds
    from ..memory.planner import size_text
    from .plan import plan_run

    largest = space.largest()
    cfg = TrainConfig.model_validate({**base.model_dump(), **largest, "output_dir": _measured_run(folder, base)})
    plan = plan_run(cfg)
    at = ", ".join(f"{k} {v:g}" for k, v in largest.items())
    lines = [
        f"cost estimate (loratune's planner{f', at {at}' if at else ''}):",
        f"  peak memory about {size_text(plan.total)} ({plan.budget_source}: "
        + ("fits)" if plan.fits else "DOES NOT FIT)"),
    ]
    if plan.epoch_seconds is None:
        return [*lines, "  time: unknown (no throughput or no training data to measure it on)"]
    per_epoch, steps = plan.resolved["steps_per_epoch"], plan.resolved["total_steps"]  # as training resolves cfg
    first_eval = min(cfg.eval_every_steps or per_epoch, steps)
    trial = plan.epoch_seconds * steps / per_epoch
    full_trials = min(settings.trials, 2 if settings.pruner == "median" else 1)  # never pruned: nothing to compare
    least = full_trials * trial + (settings.trials - full_trials) * trial * first_eval / steps
    return [
        *lines,
        f"  each trial: at most {steps} steps, about {format_seconds(trial)}{plan.likely_text(steps / per_epoch)} of "
        f"training (at {plan.tokens_per_second:,.0f} tokens/s, {plan.throughput_source}), plus its start-up",
        f"  {settings.trials} trials: about {format_seconds(settings.trials * trial)} in full; with pruning from "
        f"{format_seconds(least)} (the first {full_trials} in full, every other one pruned at its first evaluation, "
        f"step {first_eval}); early stopping shortens both",
    ]


def _measured_run(folder: Path, base: TrainConfig) -> str:
    """A trial folder with measured throughput for the plan (the latest), else the config's own output_dir."""
    trials = sorted(folder.glob("trial-*/metrics.jsonl"))
    return str(trials[-1].parent) if trials else base.output_dir
