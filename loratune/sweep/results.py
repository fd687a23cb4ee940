"""What a sweep shows and leaves: the table of trials, the best parameters, their importances, the saving of
pruning and early stopping, val_loss.png and best.yaml. All from the study, so any worker on any machine writes
the same."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ..core.console import format_seconds
from ..core.files import atomic_write
from .study import COUNTED

BEST_FILE = "best.yaml"
PLOT_FILE = "val_loss.png"


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def results_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial but the surplus ones (asked for after the study had its N, never trained)."""
    return [t for t in study.get_trials() if not t.user_attrs.get("surplus")]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = study.get_trials(states=(TrialState.COMPLETE,))
    return min(done, key=lambda t: t.value) if done else None


def table(trials: list[FrozenTrial]) -> str:
    params = list(dict.fromkeys(k for t in trials for k in t.user_attrs.get("values", {})))
    header = ["trial", "state", "best val loss", "steps", "time", *params]
    rows = [header]
    for t in trials:
        attrs = t.user_attrs
        full = attrs.get("full_steps")
        steps = f"{attrs.get('steps', 0)}/{full}" if full else str(attrs.get("steps", "-"))
        losses = [t.value] if t.state == TrialState.COMPLETE else list(t.intermediate_values.values())
        value = f"{min(losses):.4f}" if losses else "-"  # a pruned or failed trial's best so far
        seconds = format_seconds(attrs["seconds"]) if "seconds" in attrs else "-"
        values = attrs.get("values", {})
        rows.append(
            [
                trial_name(t.number),
                t.state.name.lower(),
                value,
                steps,
                seconds,
                *(shown(values.get(p, "-")) for p in params),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def importances(study: optuna.Study) -> str | None:
    """Optuna's parameter importances (fANOVA over the complete trials), or None with fewer than 2."""
    if len(study.get_trials(states=(TrialState.COMPLETE,))) < 2:
        return None
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:  # e.g. no parameter varied
        return f"parameter importances: none ({e})"
    return "parameter importances: " + ", ".join(f"{name} {share:.2f}" for name, share in found.items())


def saving(trials: list[FrozenTrial]) -> str | None:
    """Steps trained against the steps every trial would have trained in full (without pruning or early
    stopping)."""
    known = [t for t in trials if t.user_attrs.get("full_steps")]
    if not known:
        return None
    trained = sum(t.user_attrs.get("steps", 0) for t in known)
    full = sum(t.user_attrs["full_steps"] for t in known)
    share = 100 * (full - trained) / full
    return (
        f"saved by pruning and early stopping: {full - trained} of {full} steps ({share:.0f}%): "
        f"{len(known)} trials trained {trained} steps"
    )


def progress(study: optuna.Study, total: int) -> str:
    finished = sum(t.state in COUNTED for t in study.get_trials(deepcopy=False))
    best = best_trial(study)
    best_text = f"best so far {best.value:.4f} ({trial_name(best.number)})" if best else "no complete trial yet"
    return f"{finished} of {total} trials done, {best_text}"


def write_best(study: optuna.Study, folder: Path, name: str) -> Path | None:
    """best.yaml: the best trial's whole config, training into the sweep folder's best/ (`loratune train best.yaml`
    reproduces the trial)."""
    best = best_trial(study)
    if best is None or "config" not in best.user_attrs:
        return None
    config = {**best.user_attrs["config"], "output_dir": str(folder / "best")}
    header = (
        f"# loratune sweep {name}: the best trial, {trial_name(best.number)}, best validation loss {best.value:.6g}.\n"
        f"# `loratune train {folder / BEST_FILE}` trains it again (same settings, data and seed).\n"
    )
    path = folder / BEST_FILE
    atomic_write(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def plot(trials: list[FrozenTrial], folder: Path, name: str) -> Path | None:
    """val_loss.png: each trial's validation loss against steps; pruned ones dashed, the best one thick."""
    curves = [t for t in trials if t.intermediate_values]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    best = min((t for t in curves if t.state == TrialState.COMPLETE), key=lambda t: t.value, default=None)
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=130)
    for t in curves:
        steps = sorted(t.intermediate_values)
        is_best = best is not None and t.number == best.number
        ax.plot(
            steps,
            [t.intermediate_values[s] for s in steps],
            linestyle="--" if t.state == TrialState.PRUNED else "-",
            linewidth=2.5 if is_best else 1.2,
            marker="o" if len(steps) < 20 else None,
            markersize=3,
            label=f"{trial_name(t.number)} ({'best' if is_best else t.state.name.lower()})",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"sweep {name}: validation loss per trial", loc="left", fontsize=11, fontweight="bold")
    ax.legend(fontsize=8, ncol=2 if len(curves) > 10 else 1)
    fig.tight_layout()
    path = folder / PLOT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
