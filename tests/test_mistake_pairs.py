"""`loratune pairs RUN --data FILE`: the run answers the file's prompts as its held-out test does, and each wrong
answer becomes a pair that a DPO run reads (the reference chosen, the run's answer rejected, the same prompt)."""

import json
import math
import shutil

import pytest
from conftest import run_metrics, varied_rows, write_jsonl

from loratune.cli import main

BUDGET = ["--max-new-tokens", "12"]


def _answers(run, data, capsys) -> list[str]:
    assert main(["generate", str(run), "--file", data, *BUDGET]) == 0
    return [json.loads(line)["generated"] for line in capsys.readouterr().out.splitlines()]


def test_wrong_answers_become_pairs_that_a_dpo_run_reads(tiny_run, tmp_path, capsys):
    from loratune.data.formats import Example
    from loratune.data.pairs import read_preferences
    from loratune.inference.run import load_run

    rows = varied_rows(6, seed=5)
    answers = _answers(tiny_run, write_jsonl(tmp_path / "prompts.jsonl", rows), capsys)
    right = [i for i, a in enumerate(answers) if a][:2]  # references set to the run's own answers: right
    for i in right:
        rows[i]["output"] = answers[i]
    wrong = [i for i in range(len(rows)) if i not in right]
    written = [i for i in wrong if answers[i]]  # an empty answer gives no pair
    assert len(right) == 2 and written
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "pairs.jsonl"

    assert main(["pairs", str(tiny_run), "--data", data, "--out", str(out), *BUDGET]) == 0
    said = capsys.readouterr().out
    assert f"{data}: 6 prompts answered, {len(right)} right, {len(wrong)} wrong" in said
    assert f"{len(written)} pairs written to {out}" in said
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs == [
        {
            "prompt": [{"role": "user", "content": rows[i]["input"]}],
            "chosen": [{"role": "assistant", "content": rows[i]["output"]}],
            "rejected": [{"role": "assistant", "content": answers[i]}],
        }
        for i in written
    ]
    # as preference data: each pair's prompt is the tokens generation was given, its answers the two answers
    run = load_run(tiny_run)
    items = read_preferences(str(out), run.encoder, 256).items
    for item, i in zip(items, written, strict=True):
        turns = [{"role": "user", "content": rows[i]["input"]}, {"role": "assistant", "content": ""}]
        assert item.prompt == run.encoder.prompt_ids(Example(messages=turns))
        assert run.tokenizer.decode(item.rejected, skip_special_tokens=True).strip() == answers[i]


def test_the_demo_in_small_pairs_of_a_runs_mistakes_then_dpo_on_top_of_it(tiny_run, tiny_model, tmp_path, capsys):
    """The quickstart demo's steps on the tiny run: by default the run answers its own training prompts and the pairs
    go into its folder; a DPO run on top of it trains on them, with the held-out test before and after."""
    from loratune import TrainConfig, train

    run = shutil.copytree(tiny_run, tmp_path / "run")  # the session's run stays as it is
    assert main(["pairs", str(run), *BUDGET]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{tiny_run.parent / 'train.jsonl'}: 24 prompts answered, ")
    assert f"pairs written to {run / 'pairs.jsonl'}" in said
    summary = train(
        TrainConfig(model=tiny_model, objective="dpo", reference=str(run), train_data=str(run / "pairs.jsonl"),
                    val_ratio=0, test_data=str(tiny_run.parent / "test.jsonl"), max_steps=1, batch_size=4,
                    gradient_accumulation_steps=1, precision="fp32", device="cpu", learning_rate=1e-3,
                    max_length=256, output_dir=str(tmp_path / "dpo"))
    )  # fmt: skip
    assert summary["steps"] == 1 and summary["test_before"] and summary["test_after"]
    assert run_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the run is the reference


def test_the_quickstart_dpo_preset_is_dpo_on_top_of_the_quickstart_run(tmp_path, monkeypatch):
    from loratune.core.presets import PRESETS
    from loratune.core.sources import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "pairs.jsonl").write_text("")
    cfg = resolve(preset="quickstart_dpo").config
    assert (cfg.objective, cfg.reference, cfg.train_data) == ("dpo", "runs/quickstart", "runs/quickstart/pairs.jsonl")
    quickstart = PRESETS["quickstart"].values
    assert (cfg.model, cfg.test_data, cfg.max_length) == (quickstart["model"], quickstart["test_data"], 256)


def test_a_missing_run_or_a_file_without_answers_is_one_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(tmp_path / "nowhere"), "--data", str(tiny_run.parent / "val.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a loratune run folder" in err and len(err.splitlines()) == 1
    for rows in ([{"input": "send two lamps"}], [{"input": "send two lamps", "output": " "}]):
        data = write_jsonl(tmp_path / "prompts.jsonl", rows)
        assert main(["pairs", str(tiny_run), "--data", data, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "pairs needs each row's prompt and reference answer" in err and len(err.splitlines()) == 1, err
        assert not out.exists()
