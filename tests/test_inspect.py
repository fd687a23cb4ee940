"""`loratune data inspect` on a dataset built to have known token lengths, so every number has a known answer.

The tiny tokenizer reads " order" and " lamp" as one token each and adds no BOS: a row with a prompt of `a`
" order"s and a completion of 39 " lamp"s is exactly a + 39 + 1 (end token) tokens long.
"""

import json
import random

import numpy as np
import pytest
from conftest import write_jsonl

from loratune import TrainConfig
from loratune.cli import main
from loratune.data.encode import encoder_for
from loratune.data.inspect import inspect_data
from loratune.data.plan import StepPlan
from loratune.modeling.model import load_tokenizer

PROMPTS = [60] * 197 + [90] + [260] * 2  # totals: 197 x 100, 1 x 130, 2 x 300


@pytest.fixture
def known(tmp_path):
    rows = [{"prompt": " order" * a, "completion": " lamp" * 39} for a in PROMPTS]
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path / "known.jsonl", rows)


def _inspect(model, data, percentile=99.0, **settings):
    cfg = TrainConfig(
        **{
            "model": model,
            "train_data": data,
            "val_ratio": 0,
            "max_length": 128,
            "batch_size": 200,
            "gradient_accumulation_steps": 1,
            **settings,
        }
    )
    return inspect_data(cfg, encoder_for(load_tokenizer(model), cfg), percentile)


def test_numbers_on_known_lengths(tiny_model, known):
    ins = _inspect(tiny_model, known)
    assert (ins.report.rows, ins.n_train, ins.n_val, ins.report.data_format) == (200, 200, 0, "prompt_completion")
    assert (ins.total.min, ins.total.max, ins.total.mean) == (100, 300, pytest.approx(102.15))
    assert ins.total.percentiles == {50: 100, 90: 100, 95: 100, 99: 130}
    assert (ins.prompt.min, ins.prompt.max, ins.prompt.mean) == (60, 260, pytest.approx(62.15))
    assert ins.prompt.percentiles == {50: 60, 90: 60, 95: 60, 99: 90}
    assert (ins.target.min, ins.target.max, ins.target.percentiles[99]) == (40, 40, 40)
    assert ins.histogram == [(0, 64, 0), (64, 128, 197), (128, 192, 1), (192, 256, 0), (256, 320, 2)]
    # 198 of 200 must be whole: the 198th shortest is 130 tokens, and 192 is the next multiple of 64
    assert ins.recommended == 192
    now, then = ins.current, ins.at_recommended
    assert (now.max_length, now.whole, now.fit.truncated, now.fit.dropped_too_long) == (128, 197, 3, 0)
    assert (then.max_length, then.whole, then.fit.truncated, then.fit.dropped_too_long) == (192, 198, 2, 0)
    # one padded batch of all 200: (197 x 100 + 3 x 128) real tokens of 200 x 128, then of 200 x 192
    assert now.padding_share == pytest.approx(1 - (197 * 100 + 3 * 128) / (200 * 128))
    assert then.padding_share == pytest.approx(1 - (197 * 100 + 130 + 2 * 192) / (200 * 192))


def test_percentile_and_policy_change_the_answer(tiny_model, known):
    assert _inspect(tiny_model, known, percentile=95).recommended == 128
    assert _inspect(tiny_model, known, percentile=100).recommended == 320
    drop = _inspect(tiny_model, known, truncation="drop").current
    assert (drop.whole, drop.fit.truncated, drop.fit.dropped_too_long) == (197, 0, 3)
    ins = _inspect(tiny_model, known, max_length=192)
    assert ins.recommended == 192 and ins.at_recommended is None


def test_padding_share_uses_the_trainers_grouping():
    # a step of 4 is sorted by length and cut into passes of 2: [10, 10] and [20, 20], no padding
    def padding_share(lengths, batch_size, accumulation):
        lengths = np.array(lengths)
        return StepPlan(lengths, lengths, batch_size * accumulation, batch_size, packing=False).padding_share()

    assert padding_share([10, 20, 10, 20], batch_size=2, accumulation=2) == 0
    assert padding_share([10, 30], batch_size=2, accumulation=1) == pytest.approx(1 / 3)


def test_cli_prints_the_numbers(tiny_model, known, capsys):
    code = main(
        [
            "data",
            "inspect",
            "--data",
            known,
            "--model",
            tiny_model,
            "--val-ratio",
            "0",
            "--max-length",
            "128",
            "--batch-size",
            "200",
            "--gradient-accumulation-steps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "data: 200 rows (prompt_completion): 200 training + 0 validation examples" in out
    assert "  total                    100   102.2     100     100     100     130     300" in out
    assert "      65-128     ########################################" in out
    assert "recommended max_length: 192, the smallest multiple of 64 that keeps 99% of examples whole" in out
    assert (
        "at max_length=128 (current), truncation=truncate_prompt_left:\n  197 of 200 examples whole (98.5%), "
        "3 truncated\n  padding: none (packing is on); padded batches of 200 would be 22% padding" in out
    )
    assert main(["data", "inspect", "--data", known, "--model", tiny_model, "--percentile", "95"]) == 0
    assert (
        "recommended max_length: 128, the smallest multiple of 64 that keeps 95% of examples whole"
        in capsys.readouterr().out
    )


def test_cli_without_data_says_what_to_give(tiny_model, capsys):
    assert main(["data", "inspect", "--model", tiny_model]) == 2
    assert "give a run config (loratune data inspect run.yaml) or a data file (--data FILE)" in capsys.readouterr().err


def test_cli_shows_the_planned_peak_per_max_length_and_json(tiny_model, known, capsys):
    args = ["data", "inspect", "--data", known, "--model", tiny_model, "--max-length", "128", "--device", "cpu"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("estimated peak training")]
    assert [line.split(":")[0] for line in lines] == [
        "estimated peak training memory at max_length=128",
        "estimated peak training memory at max_length=192",
    ]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] == 192 and data["current"]["whole"] == 197
    assert data["memory"][0].startswith("estimated peak training memory at max_length=128: ")
