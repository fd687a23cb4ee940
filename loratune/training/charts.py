"""Which charts a run's objective metrics make, beside loss, learning rate, gradient norm and throughput: the run's
report draws them with matplotlib and the UI with uPlot, from this one description.

A chart is found from the metrics lines themselves (the names a step line carries), so a run of any objective, or
one written by an older loratune, gets the charts its lines can fill and no empty ones: SFT lines carry none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# What every step line carries whatever the objective (the units' counts and rates are found by their `_per_s`).
COMMON = {"event", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "padding_share", "seconds",
          "time"}  # fmt: skip


@dataclass(frozen=True)
class Series:
    key: str  # the name in step lines
    label: str
    validation: bool  # whether eval lines carry it as val_KEY with a meaning of its own


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    y_label: str
    percent: bool
    series: tuple[Series, ...]

    def to_json(self) -> dict:
        return asdict(self)


# (id, title, y label, percent, [(key, label, validation)]): the known objectives' metrics, in the order shown.
# GRPO validates by greedy answers' rewards alone: its other metrics are of sampled answers, training only.
KNOWN = (
    ("reward_accuracy", "Reward accuracy (chosen rewarded above rejected)", "pairs", True,
     [("reward_accuracy", "reward accuracy", True)]),
    ("pair_rewards", "Rewards of the chosen and rejected answers", "reward", False,
     [("chosen_reward", "chosen", True), ("rejected_reward", "rejected", True), ("reward_margin", "margin", True)]),
    ("pair_logps", "Log-probability of the answers", "log-probability", False,
     [("chosen_logp", "chosen", True), ("rejected_logp", "rejected", True)]),
    ("kto_reward", "Signed reward (desirable +, undesirable −)", "reward", False,
     [("signed_reward", "signed reward", True)]),
    ("kto_logp", "Log-probability of the answers", "log-probability", False, [("logp", "log-probability", True)]),
    ("reward", "Reward (training: sampled answers; validation: greedy)", "reward", False,
     [("reward", "mean reward", True)]),
    ("reward_std", "Reward spread within a group", "standard deviation", False,
     [("reward_std", "reward std", False)]),
    ("kl", "KL to the reference (per token)", "KL", False, [("kl", "KL", False)]),
    ("completion_length", "Completion length", "tokens", False, [("completion_length", "mean length", False)]),
    ("shares", "Clipped tokens and zero-variance groups", "share", True,
     [("clipped", "clipped share", False), ("zero_std_groups", "zero-variance groups", False)]),
)  # fmt: skip
KTO_KL = ("kto_kl", "KL estimate of the policy to the reference", "KL", False, [("kl", "KL", True)])


def metric_charts(records: list[dict]) -> list[Chart]:
    """The charts of the objective metrics that the step lines among `records` carry; each reward function's
    score (GRPO's reward_NAME) in one chart, and any metric this list does not know in a chart of its own."""
    keys = _metric_keys(records)
    known = [KTO_KL if c[0] == "kl" else c for c in KNOWN] if "signed_reward" in keys else KNOWN
    charts, shown = [], set()
    for chart_id, title, y_label, percent, series in known:
        present = [Series(*s) for s in series if s[0] in keys and s[0] not in shown]
        if present:
            charts.append(Chart(chart_id, title, y_label, percent, tuple(present)))
            shown.update(s.key for s in present)
    rewards = [k for k in keys if k.startswith("reward_") and k not in shown]
    if rewards and "reward" in shown:
        charts.insert(
            [c.id for c in charts].index("reward") + 1,
            Chart("reward_functions", "Reward of each function", "reward", False,
                  tuple(Series(k, k.removeprefix("reward_"), True) for k in rewards)),
        )  # fmt: skip
        shown.update(rewards)
    for k in keys:
        if k not in shown:
            charts.append(Chart(k, k.replace("_", " "), k.replace("_", " "), False, (Series(k, k, True),)))
    return charts


def charts_json(records: list[dict]) -> list[dict]:
    return [c.to_json() for c in metric_charts(records)]


def _metric_keys(records: list[dict]) -> list[str]:
    """The numeric names of step lines beyond the common ones and the units' counts, in their first order."""
    keys: dict[str, None] = {}
    for r in records:
        if r.get("event") != "train":
            continue
        for k, v in r.items():
            if k in COMMON or k.endswith("_per_s") or f"{k}_per_s" in r or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) or v is None:
                keys.setdefault(k, None)
    return list(keys)
