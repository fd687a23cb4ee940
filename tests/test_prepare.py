"""From a config to tokenized sets: the tokenization cache, the validation split, max_length policies, and the
refusal to train on examples with nothing to learn."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import varied_rows, write_jsonl

from loratune import TrainConfig
from loratune.core.errors import UserError
from loratune.data.encode import IGNORE, Encoder, encoder_for
from loratune.data.prepare import _load, fit, prepare, recommend_max_length, windows
from loratune.modeling.model import load_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own, so other tests' entries are never found."""
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(model, **settings):
    return TrainConfig(**{"model": model, "max_length": 256, **settings})


def _prepare(cfg):
    return prepare(cfg, encoder_for(load_tokenizer(cfg.model), cfg))


def _same(a, b):
    assert a.origins == b.origins
    assert all(np.array_equal(x, y) for x, y in zip(a.input_ids + a.labels, b.input_ids + b.labels))


# --- the cache ----------------------------------------------------------------------------------------------


def test_second_run_reads_the_cache_and_does_not_tokenize(tiny_model, tmp_path, cache, monkeypatch):
    cfg = _cfg(tiny_model, train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(20)))
    first = _prepare(cfg)
    assert not first.report.from_cache and len(list((cache / "data").iterdir())) == 1

    def refuse(self, example):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Encoder, "encode", refuse)
    second = _prepare(cfg)
    assert second.report.from_cache and second.report.rows == 20
    _same(first.train, second.train)
    _same(first.val, second.val)
    assert not second.train.input_ids[0].flags.writeable  # a view into the memory-mapped Arrow file
    # max_length and the split are applied after the cache: changing them does not tokenize either
    third = _prepare(cfg.model_copy(update={"max_length": 32, "val_ratio": 0.2, "seed": 1}))
    assert third.report.from_cache and third.report.truncated > 0
    assert len(third.val) + third.report.val_fit.dropped_too_long == 4


def test_reading_the_cache_leaves_pandas_unimported(tiny_model, tmp_path, cache):
    """pandas costs every run's start; pyarrow's `to_numpy` would import it."""
    _prepare(_cfg(tiny_model, train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(6))))
    (entry,) = (cache / "data").iterdir()
    show = "print([len(a) for a in data.input_ids], [int(s) for s in data.answer_starts], 'pandas' in sys.modules)"
    load = f"from loratune.data.prepare import _load; data, _ = _load(__import__('pathlib').Path({str(entry)!r}))"
    read = f"import sys; {load}; {show}"
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True).stdout
    data, _ = _load(entry)
    assert out.split() == f"{[len(a) for a in data.input_ids]} {[int(s) for s in data.answer_starts]} False".split()


def test_cache_key_follows_content_and_settings(tiny_model, tmp_path, cache):
    path = tmp_path / "train.jsonl"
    cfg = _cfg(tiny_model, train_data=write_jsonl(path, varied_rows(10)))
    base = _prepare(cfg)
    for changed in (
        cfg.model_copy(update={"train_on_inputs": True}),
        cfg.model_copy(update={"chat_template": "plain"}),
    ):
        assert not _prepare(changed).report.from_cache
    assert _prepare(cfg).report.from_cache
    write_jsonl(path, varied_rows(10, seed=5))  # same file, new content
    again = _prepare(cfg)
    assert not again.report.from_cache and again.train.origins == base.train.origins
    assert not all(np.array_equal(x, y) for x, y in zip(base.train.input_ids, again.train.input_ids))


def test_skipped_rows_are_reported_from_the_cache_too(tiny_model, tmp_path, cache):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"input": "q{i}", "output": "a{i}"}}\n' for i in range(6)) + "oops\n")
    cfg = _cfg(tiny_model, train_data=str(path), skip_bad_rows=True, val_ratio=0)
    for _ in range(2):
        r = _prepare(cfg).report
        assert (r.rows, r.bad_rows, r.first_bad) == (
            7,
            1,
            f"{path} line 7: not valid JSON (Expecting value at column 1)",
        )


# --- validation ---------------------------------------------------------------------------------------------


def test_validation_split_is_seeded_and_reports_duplicates(tiny_model, tmp_path):
    rows = varied_rows(40)
    cfg = _cfg(tiny_model, train_data=write_jsonl(tmp_path / "train.jsonl", rows), val_ratio=0.1)
    a, b = _prepare(cfg), _prepare(cfg)
    assert len(a.train) == 36 and len(a.val) == 4 and a.val.origins == b.val.origins
    assert set(a.train.origins).isdisjoint(a.val.origins)
    assert _prepare(cfg.model_copy(update={"seed": 7})).val.origins != a.val.origins
    assert len(_prepare(cfg.model_copy(update={"val_ratio": 0})).val) == 0
    # a val file that repeats two training rows (and a training file that repeats one of its own)
    cfg = cfg.model_copy(
        update={
            "train_data": write_jsonl(tmp_path / "t2.jsonl", rows + rows[:1]),
            "val_data": write_jsonl(tmp_path / "val.jsonl", rows[3:5] + varied_rows(3, seed=9)),
        }
    )
    report = _prepare(cfg).report
    assert (report.duplicates_train_val, report.duplicates_train) == (2, 1)
    assert any("2 validation examples also appear in the training data" in text for _, text in report.lines())


def test_single_example_cannot_be_split(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, train_data=write_jsonl(tmp_path / "t.jsonl", varied_rows(1)))
    with pytest.raises(UserError, match="single example: nothing to hold out"):
        _prepare(cfg)


# --- max_length ---------------------------------------------------------------------------------------------


def _long_prompts(n):
    """Answers of 2 tokens + end token; prompts long enough that max_length=24 must cut every one."""
    return [{"prompt": " order" * (30 + i), "completion": " lamp lamp"} for i in range(n)]


def test_truncation_policies_and_their_counts(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", _long_prompts(10) + [{"prompt": " order", "completion": " lamp"}] * 2)
    cfg = _cfg(tiny_model, train_data=path, val_ratio=0, max_length=24)
    left = _prepare(cfg)
    assert (left.report.truncated, left.report.dropped_too_long) == (10, 0)
    assert set(left.train.lengths) == {24, 3} and all(x[-1] == left.train.labels[0][-1] for x in left.train.labels)
    assert left.train.target_counts.tolist() == [3] * 10 + [2] * 2  # answers and end tokens kept whole
    drop = _prepare(cfg.model_copy(update={"truncation": "drop"}))
    assert (len(drop.train), drop.report.dropped_too_long) == (2, 10)
    assert drop.report.train_fit.first_too_long == f"{path} line 1"
    with pytest.raises(
        UserError,
        match=r"83% of the training examples would train on no answer token at max_length=24 "
        r"with truncation=truncate_end .*first: .*t.jsonl line 1",
    ):
        _prepare(cfg.model_copy(update={"truncation": "truncate_end"}))


def test_answers_longer_than_max_length_refuse_to_start(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": " lamp" * 40}] * 3)
    with pytest.raises(
        UserError,
        match=r"no training example is left at max_length=16 .*3 are longer .*max_length=64 "
        r"would keep 99% whole",
    ):
        _prepare(_cfg(tiny_model, train_data=path, val_ratio=0, max_length=16))


def test_a_few_cut_answers_are_dropped_and_reported(tiny_model, tmp_path):
    rows = [{"prompt": " order", "completion": " lamp"}] * 40 + [{"prompt": " order" * 30, "completion": " lamp"}]
    cfg = _cfg(
        tiny_model,
        train_data=write_jsonl(tmp_path / "t.jsonl", rows),
        val_ratio=0,
        max_length=16,
        truncation="truncate_end",
    )
    data = _prepare(cfg)
    assert len(data.train) == 40 and data.report.dropped_no_target == 1
    assert any(
        "1 examples had no answer token left" in text and "line 41" in text
        for warn, text in data.report.lines()
        if warn
    )


def test_plain_text_is_split_into_windows_that_predict_every_token_once(tiny_model, tmp_path):
    rows = [{"text": " order" * 50}, {"text": " lamp" * 5}]
    cfg = _cfg(tiny_model, train_data=write_jsonl(tmp_path / "t.jsonl", rows), val_ratio=0, max_length=16)
    data = _prepare(cfg)
    assert data.report.data_format == "text" and data.report.train_fit.windows == 3
    assert data.train.lengths.tolist() == [16, 16, 16, 6, 6] and data.report.recommended_max_length is None
    # the windows' targets, in order, are the document's tokens after the first: none lost, none twice
    targets = np.concatenate([y[1:] for y in data.train.labels[:4]])
    doc = np.concatenate([data.train.input_ids[0], *(x[1:] for x in data.train.input_ids[1:4])])
    assert targets.tolist() == doc[1:].tolist() and len(doc) == 51


def test_windows_and_fit_on_edges():
    ids = np.arange(17)
    assert [w[0].tolist() for w in windows(ids, ids, 16)] == [list(range(16)), [15, 16]]
    assert [w[0].tolist() for w in windows(ids[:16], ids[:16], 16)] == [list(range(16))]
    empty_target = np.array([IGNORE, IGNORE, IGNORE])
    from loratune.data.prepare import TokenizedSet

    kept, counts = fit(TokenizedSet([ids[:3]], [empty_target], ["x line 1"], np.array([3])), 16, "drop", False)
    assert len(kept) == 0 and counts.first_no_target == "x line 1"


def test_recommended_max_length():
    lengths = np.array([100] * 197 + [130] + [300] * 2)
    assert recommend_max_length(lengths) == 192  # 198 of 200 must fit: the 198th longest is 130
    assert recommend_max_length(lengths, 95) == 128
    assert recommend_max_length(lengths, 100) == 320
    assert recommend_max_length(np.array([10])) == 64
    assert recommend_max_length(np.array([64, 65])) == 128 and recommend_max_length(np.array([64, 65]), 50) == 64
