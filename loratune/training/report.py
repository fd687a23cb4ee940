"""The run's report: `loss.png` (losses against steps and tokens, learning rate, best step), `metrics.png` (the
objective's metrics, training and validation: preference rewards, GRPO's rewards and KL; none for SFT) and
`report.md`.

Written at the end of training and by `loratune report RUN_DIR`, from what the run folder already holds
(metrics.jsonl, summary.json, config.yaml, data.json): no model is loaded.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from ..core.console import format_seconds
from ..core.errors import UserError
from ..core.files import atomic_write
from .charts import Chart, metric_charts

SAMPLE_CHARS = 600  # longer prompts and answers are cut in the report


def write_report(run_dir: str | Path, drawn: Callable[[], bool] | None = None) -> tuple[Path, Path]:
    """Write loss.png, metrics.png (when the objective logs metrics) and report.md into the run folder; returns the
    paths of loss.png and report.md. `drawn`: whether another process has drawn the plots of these same records
    (training's `PlotProcess`, waited for here); when it has not, they are drawn here."""
    run = Path(run_dir)
    train, evals = read_records(run)
    summary = _read_json(run / "summary.json")
    best = best_evaluation(summary, evals)
    if not (drawn and drawn()):
        draw_plots(run, train, evals, best)
    report = run / "report.md"
    plot = run / "loss.png"
    markdown = _markdown(run, train, evals, summary, best, plot if train else None, metric_charts(train))
    atomic_write(report, markdown)
    return plot, report


def read_records(run: Path) -> tuple[list[dict], list[dict]]:
    """The training steps' and the evaluations' records of metrics.jsonl."""
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"{run}: not a loratune run folder (no metrics.jsonl)")
    records = _records(run / "metrics.jsonl")
    return [r for r in records if r["event"] == "train"], [r for r in records if r["event"] == "eval"]


def draw_plots(run: Path, train: list[dict], evals: list[dict], best: dict | None) -> None:
    """loss.png (when a step was logged) and metrics.png (when the objective logs metrics)."""
    charts = metric_charts(train)
    if train:
        y_label = "loss (the objective's)" if charts else "loss (mean cross-entropy per answer token)"
        plot_losses(train, evals, best, run / "loss.png", title=run.resolve().name, y_label=y_label)
    if charts:
        plot_metrics(train, evals, charts, run / METRICS_PLOT, title=run.resolve().name)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        raise UserError(f"{path}: not valid JSON (damaged?)") from None


def _records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:  # e.g. cut off by a crash; resuming the run rewrites the file to its checkpoint
                raise UserError(
                    f"{path} line {number}: not valid JSON (damaged? --resume repairs a run's "
                    "metrics up to its last checkpoint)"
                ) from None
    return records


def best_evaluation(summary: dict | None, evals: list[dict]) -> dict | None:
    """The best evaluation: as training chose it, or (for a run that did not finish) the lowest validation loss."""
    step = summary.get("best_step") if summary else None
    chosen = [r for r in evals if r["step"] == step] if step is not None else []
    if not chosen and evals and not summary:
        chosen = [min(evals, key=lambda r: r["val_loss"])]
    return chosen[-1] if chosen else None


# --- The plot ----------------------------------------------------------------------------------------------


def preload_plotting() -> None:
    """Import the plotting library in the background, so that writing the report after training does not wait for
    it: training releases the interpreter lock in its kernels, so the import costs the run almost nothing."""
    threading.Thread(target=pyplot, name="loratune-preload-plotting", daemon=True).start()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works on servers
    import matplotlib.pyplot as plt

    return plt


def plot_losses(train: list[dict], evals: list[dict], best: dict | None, path: Path, title: str, y_label: str) -> None:
    """loss.png: training and validation loss against steps (and tokens, on the top axis), the learning rate on the
    right axis, and the best step marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=130)
    steps = _curves(ax, train, evals, best)
    ax.set_ylabel(y_label)
    lr_ax = _learning_rate(ax, steps, [r["lr"] for r in train])
    _tokens_axis(ax, steps, [r["tokens"] for r in train])
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    # Below the axes, so it never hides a curve.
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=9, frameon=False)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    fig.tight_layout(rect=(0, 0.06 if len(handles) <= 3 else 0.1, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


METRICS_PLOT = "metrics.png"


def plot_metrics(train: list[dict], evals: list[dict], charts: list[Chart], path: Path, title: str) -> None:
    """metrics.png: one panel per chart of the objective's metrics, each metric's training values against steps
    and its validation values (dashed, dotted) where validation measures it."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    plt = pyplot()
    cols = 2 if len(charts) > 1 else 1
    rows = -(-len(charts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, chart in zip(axes.flat, charts):
        for i, series in enumerate(chart.series):
            color = colors[i % len(colors)]
            steps, values = _points(train, series.key)
            ax.plot(steps, values, color=color, lw=1.4, label=f"{series.label} (training)" if series.validation
                    else series.label)  # fmt: skip
            if series.validation:
                steps, values = _points(evals, f"val_{series.key}")
                ax.plot(
                    steps, values, color=color, ls="--", marker="o", ms=4, lw=1.6, label=f"{series.label} (validation)"
                )
        if chart.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(chart.title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(chart.y_label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(charts) :]:
        ax.set_visible(False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11, fontweight="bold")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The steps and values of the records that carry `key` (a non-finite value stays: matplotlib leaves a gap)."""
    found = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in found], [v for _, v in found]


def _curves(ax, train: list[dict], evals: list[dict], best: dict | None):
    """The losses, on a log scale when they fall by orders of magnitude; returns the steps."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps = np.array([r["step"] for r in train], dtype=float)
    losses = np.array([r["loss"] for r in train], dtype=float)
    many = len(steps) > 40
    label = "training loss (per step)" if many else "training loss"
    ax.plot(
        steps, losses, color="tab:blue", alpha=0.35 if many else 1.0, lw=1, marker=None if many else ".", label=label
    )
    if many:  # a running mean shows the trend through step-to-step noise
        smooth = _smooth(losses, max(5, len(steps) // 25))
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="training loss (smoothed)")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            color="tab:orange",
            lw=2,
            marker="o",
            ms=5,
            label="validation loss",
        )
    if best:
        ax.axvline(best["step"], color="tab:green", ls=":", lw=1.2)
        ax.plot(
            best["step"],
            best["val_loss"],
            marker="*",
            ms=16,
            color="tab:green",
            ls="none",
            label=f"best: step {best['step']}, validation loss {best['val_loss']:.4f}",
        )
    shown = np.concatenate([losses[np.isfinite(losses)], [r["val_loss"] for r in evals]])
    if len(shown) and shown.min() > 0 and shown.max() / shown.min() > 10:
        ax.set_yscale("log")  # losses that fall by orders of magnitude stay readable at the end
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_xlim(0, steps.max() * 1.02)
    ax.grid(alpha=0.3)
    return steps


def _learning_rate(ax, steps, lrs: list[float]):
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    lr_ax = ax.twinx()
    lr_ax.plot(steps, lrs, color="tab:gray", ls="--", lw=1.2, label="learning rate (right axis)")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    lr_ax.tick_params(axis="y", colors="tab:gray")
    lr_ax.set_ylim(0, max(lrs) * 1.1 if max(lrs) > 0 else 1)
    lr_ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}".replace("e-0", "e-") if v else "0"))
    return lr_ax


def _tokens_axis(ax, steps, tokens_per_step: list[int]) -> None:
    """Tokens processed on the top axis: cumulative tokens at the end of each step, interpolated between steps."""
    import numpy as np
    from matplotlib.ticker import EngFormatter

    at_step = np.concatenate([[0.0], steps]), np.concatenate([[0.0], np.cumsum(tokens_per_step).astype(float)])
    to_tokens, to_steps = (lambda s: np.interp(s, *at_step)), (lambda t: np.interp(t, at_step[1], at_step[0]))
    top = ax.secondary_xaxis("top", functions=(to_tokens, to_steps))
    top.set_xlabel("tokens processed (prompts + answers)")
    top.xaxis.set_major_formatter(EngFormatter(sep=""))


def _smooth(values, window: int):
    import numpy as np

    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


# --- The markdown -----------------------------------------------------------------------------------------


def _markdown(run: Path, train, evals, summary, best, plot: Path | None, charts: list[Chart]) -> str:
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) or {}
    lines = [f"# {run.resolve().name}", ""]
    target = config.get("lora_target_modules")
    lines += [
        f"LoRA fine-tune of `{config.get('model')}` on `{config.get('train_data')}`: rank {config.get('lora_r')}, "
        f"alpha {config.get('lora_alpha')}, on {target if isinstance(target, str) else ', '.join(target or [])}.",
        "",
    ]
    if plot:
        lines += [f"![training{' and validation' if evals else ''} loss]({plot.name})", ""]

    lines += ["## Outcome", "", "| | |", "|---|---|"]
    if summary:
        lines += [
            f"| stopped | {summary['stop_reason']} |",
            f"| steps | {summary['steps']} ({summary['epochs']} epochs) |",
            f"| training time | {format_seconds(summary['train_seconds'])} |",
        ]
    else:
        last = train[-1] if train else {"step": 0, "epoch": 0}
        lines += [
            f"| stopped | not finished (no summary.json); last logged step {last['step']}, epoch {last['epoch']} |"
        ]
    if best:
        lines += [f"| best step | {best['step']} (epoch {best['epoch']}), validation loss {best['val_loss']:.4f} |"]
    if evals:
        lines += [f"| last validation loss | {evals[-1]['val_loss']:.4f} (step {evals[-1]['step']}) |"]
    if train:
        first, last = train[0], train[-1]
        lines += [
            f"| training loss | {first['loss']:.4f} at step {first['step']}, "
            f"{last['loss']:.4f} at step {last['step']} |"
        ]
    lines.append("")

    lines += _metrics_section(train, best, charts)
    lines += _test_section(summary, config)
    lines += _data_section(run, summary)
    lines += _speed_section(train, summary)
    lines += [
        "## Config",
        "",
        "<details><summary>config.yaml (the resolved settings of this run)</summary>",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _metrics_section(train: list[dict], best: dict | None, charts: list[Chart]) -> list[str]:
    """The objective's metrics: their chart, and each one's value at the first and last step and at the best
    validation."""
    if not charts:
        return []
    lines = ["## Objective metrics", "", f"![the objective's metrics]({METRICS_PLOT})", ""]
    lines += ["| metric | first step | last step | best validation |", "|---|---|---|---|"]
    for chart in charts:
        for series in chart.series:
            val = (best or {}).get(f"val_{series.key}") if series.validation else None
            cells = [train[0].get(series.key), train[-1].get(series.key), val]
            shown = [_metric_text(v, chart.percent) for v in cells]
            lines.append(f"| {series.key.replace('_', ' ')} | {' | '.join(shown)} |")
    return lines + [""]


def _metric_text(value, percent: bool) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.1%}" if percent else f"{value:.4g}"


def _test_section(summary, config: dict) -> list[str]:
    before, after = (summary or {}).get("test_before"), (summary or {}).get("test_after")
    if not after:
        return [
            "## Sample generations",
            "",
            "No held-out test set in this run (set `test_data`, or run "
            "`loratune eval RUN_DIR --data FILE --generate`).",
            "",
        ]
    metrics = [k for k in after if k != "samples"]
    lines = [
        f"## Held-out test (`{config.get('test_data')}`, greedy generation)",
        "",
        "| | base model | fine-tuned |",
        "|---|---|---|",
    ]
    for k in metrics:
        lines.append(f"| {k.replace('_', ' ')} | {(before or {}).get(k, float('nan')):.1%} | {after[k]:.1%} |")
    lines += ["", "## Sample generations", ""]
    examples = _test_examples(config, len(after["samples"]))
    for i, generated in enumerate(after["samples"]):
        lines.append(f"### Example {i + 1}")
        if i < len(examples):
            lines += ["", "Prompt:", "", *_block(examples[i][0]), "", "Reference:", "", *_block(examples[i][1])]
        if before and i < len(before["samples"]):
            lines += ["", "Base model:", "", *_block(before["samples"][i])]
        lines += ["", "Fine-tuned:", "", *_block(generated), ""]
    return lines


def _test_examples(config: dict, n: int) -> list[tuple[str, str]]:
    """(prompt, reference) of the first test examples, the ones training generated its samples for."""
    from ..core.config import TrainConfig
    from ..data.encode import Encoder
    from ..data.formats import prompt_text
    from ..data.prepare import read_examples

    if not config.get("test_data") or not Path(config["test_data"]).exists():
        return []
    try:
        cfg = TrainConfig(**config)
        examples = read_examples(cfg.test_data, "test", cfg)[:n]
    except UserError:  # the file changed since training: show the generations alone
        return []
    return [(prompt_text(ex), Encoder.reference(ex)) for ex in examples]


def _block(text: str) -> list[str]:
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
    return ["```text", text.replace("```", "'''"), "```"]


def _data_section(run: Path, summary) -> list[str]:
    """The data lines training printed at its start (from data.json), and the tokens it went through."""
    from ..data.prepare import DataReport, Fit

    lines = []
    raw = _read_json(run / "data.json")
    try:
        report = DataReport(**{**raw, "train_fit": Fit(**raw["train_fit"]), "val_fit": Fit(**raw["val_fit"])})
        lines += [f"- {'warning: ' if warn else ''}{message}" for warn, message in report.lines()]
    except (TypeError, KeyError):  # no data.json, or one written by another version of loratune
        pass
    if summary:
        count, unit = _units(summary)
        what = (
            f", {count:,} of them answer tokens (the ones with loss)" if unit == SFT_UNIT else f" in {count:,} {unit}"
        )
        lines.append(f"- {summary['tokens']:,} tokens processed{what}")
    return ["## Data", "", *lines, ""] if lines else []


SFT_UNIT = "target tokens"


def _units(summary: dict) -> tuple[int, str]:
    """The count of the units the loss is a mean over, and their name (summaries before `unit`: SFT's)."""
    unit = summary.get("unit", SFT_UNIT)
    return summary[unit.replace(" ", "_")], unit


def _speed_section(train: list[dict], summary) -> list[str]:
    lines = ["## Throughput and memory", "", "| | |", "|---|---|"]
    if summary:
        seconds = max(summary["train_seconds"], 1e-9)
        count, unit = _units(summary)
        rate = f"{count / seconds:,.0f} answer tokens" if unit == SFT_UNIT else f"{count / seconds:,.2f} {unit}"
        lines += [
            f"| tokens per second | {summary['tokens_per_s']:,.0f} ({rate}) |",
            f"| base precision | {summary['precision']} (LoRA weights fp32) |",
            f"| batches | {'packed rows' if summary['packing'] else 'padded'}, "
            f"{summary['processes']} process{'es' if summary['processes'] > 1 else ''} |",
        ]
        if summary.get("peak_memory_bytes"):
            lines.append(
                f"| peak memory | {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_of']}) |"
            )
        else:
            lines.append("| peak memory | not recorded by this run |")
    if train:
        lines.append(f"| seconds per step | {statistics.median(r['seconds'] for r in train):.2f} (median) |")
        padding = statistics.mean(r.get("padding_share", 0) for r in train)
        lines.append(f"| padding | {padding:.1%} of the tokens in batches |")
    return lines + [""]
