"""Shapes and file readers: every shape is detected, every file type read with its rows' origins, and every kind
of bad input stops with one line that says where and what (or is counted under --skip-bad-rows)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from loratune import TrainConfig
from loratune.core.errors import UserError
from loratune.core.sources import resolve
from loratune.data.formats import Example, RowError, detect_format, require_answers, to_example
from loratune.data.load import BadRows, open_source
from loratune.data.prepare import read_examples

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
]
ROWS = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "greet", "input": "Ann", "output": "hello Ann"},
    "input_output": {"input": "hi", "output": "hello"},
    "prompt_completion": {"prompt": "hi", "completion": " hello"},
    "text": {"text": "some plain text"},
}


def _rows(spec, skip=False, split="train"):
    bad = BadRows(skip)
    return list(open_source(str(spec), split).rows(bad)), bad


def _examples(path, **settings):
    return read_examples(str(path), "train", TrainConfig(**settings))


# --- shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(ROWS))
def test_every_shape_is_detected_from_its_columns(shape):
    assert detect_format(list(ROWS[shape]), {}) == shape


def test_shapes_become_canonical_examples():
    hello = {"role": "assistant", "content": "hello"}
    assert to_example(ROWS["messages"], "messages", {}).messages == CHAT
    assert to_example(ROWS["sharegpt"], "sharegpt", {}).messages == [{"role": "user", "content": "hi"}, hello]
    alpaca = to_example(ROWS["alpaca"], "alpaca", {}).messages
    assert alpaca == [{"role": "user", "content": "greet\n\nAnn"}, {"role": "assistant", "content": "hello Ann"}]
    with_system = to_example({**ROWS["input_output"], "system": "be brief"}, "input_output", {})
    assert with_system.messages == CHAT
    assert to_example(ROWS["prompt_completion"], "prompt_completion", {}) == Example(prompt="hi", completion=" hello")
    assert to_example(ROWS["text"], "text", {}) == Example(completion="some plain text", train_all=True)


def test_column_mapping():
    mapping = {"input": "question", "output": "answer"}
    row = {"question": "hi", "answer": "hello", "id": 3}
    assert detect_format(list(row), mapping) == "input_output"
    assert to_example(row, "input_output", mapping).messages[-1] == {"role": "assistant", "content": "hello"}
    # the flag form of the mapping
    assert TrainConfig(columns="input=question, output=answer").columns == mapping


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"input": "hi"}, "input_output", "missing field 'output'"),
        ({"input": "hi", "output": 3}, "input_output", "field 'output' must be text, got int"),
        ({"input": "hi", "output": "  "}, "input_output", "field 'output' is empty"),
        ({"prompt": "hi", "completion": ""}, "prompt_completion", "field 'completion' is empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn after a user"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "no assistant turn after a user"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "messages[0].role = 'wizard'"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages", "messages[0].content must be text, got list"),
        ({"messages": [{"role": "user"}]}, "messages", "messages[0] must be an object with 'role' and 'content'"),
        ({"messages": []}, "messages", "must be a non-empty list of turns"),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            "conversations[1] is an empty assistant turn",
        ),
    ],
)
def test_bad_rows_say_what_is_wrong(row, fmt, message):
    with pytest.raises(RowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        require_answers(to_example(row, fmt, {}), fmt, {})


def test_prompts_without_answers_are_examples_but_not_training_rows():
    """Generation builds Examples from prompts alone; only training needs the answers."""
    ex = to_example({"question": "hi", "answer": ""}, "input_output", {"input": "question", "output": "answer"})
    with pytest.raises(RowError, match="field 'answer' is empty"):
        require_answers(ex, "input_output", {"input": "question", "output": "answer"})


def test_undetectable_columns_and_missing_named_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "hi", "reply": "hello"}])
    with pytest.raises(
        UserError, match=r"d.jsonl line 1: cannot tell the data format from columns \['question', 'reply'\]"
    ):
        _examples(path)
    with pytest.raises(UserError, match="line 1: data_format input_output needs column 'input', which is missing"):
        _examples(path, data_format="input_output")
    assert len(_examples(path, columns={"input": "question", "output": "reply"})) == 1


# --- file types ---------------------------------------------------------------------------------------------


def test_jsonl_rows_with_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": "d"}\n')
    rows, _ = _rows(path)
    assert [w for w, _ in rows] == [f"{path} line 1", f"{path} line 3"]


def test_json_list_wrapper_and_jsonl_named_json(tmp_path):
    records = [ROWS["input_output"], ROWS["input_output"]]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": records}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("list.json", "wrapped.json"):
        rows, _ = _rows(tmp_path / name)
        assert [r for _, r in rows] == records and rows[1][0].endswith(f"{name} record 1")
    rows, _ = _rows(tmp_path / "lines.json")
    assert [r for _, r in rows] == records and rows[1][0].endswith("lines.json line 2")


def test_csv_with_bom_quoted_newlines_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_bytes('\ufeffinput,output\n"two\nlines","a, b"\nx,y\n'.encode())
    rows, _ = _rows(tmp_path / "d.csv")
    assert [r for _, r in rows] == [{"input": "two\nlines", "output": "a, b"}, {"input": "x", "output": "y"}]
    assert rows[1][0].endswith("d.csv line 4")
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nhi\t hello\n")
    assert [r for _, r in _rows(tmp_path / "d.tsv")[0]] == [{"prompt": "hi", "completion": " hello"}]


def test_parquet_with_nested_messages(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT}]), tmp_path / "d.parquet")
    examples = _examples(tmp_path / "d.parquet")
    assert [ex.messages for ex in examples] == [CHAT, CHAT]
    rows, _ = _rows(tmp_path / "d.parquet")
    assert rows[1][0].endswith("d.parquet row 1")


def test_folder_of_mixed_files_skips_hidden_and_other_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [ROWS["input_output"]])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text("input,output\nx,y\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "a.jsonl", [{"broken": 1}])
    (tmp_path / "README.md").write_text("not data")
    rows, _ = _rows(tmp_path)
    assert [w.split(str(tmp_path) + "/")[1] for w, _ in rows] == ["a.jsonl line 1", "sub/b.csv line 2"]


def test_unsupported_file_and_empty_folder(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match=r"unsupported file type \.txt; use one of \.jsonl"):
        _rows(tmp_path / "d.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder has no data files"):
        _rows(tmp_path / "empty")


# --- bad input ----------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": \n["a list"]\n')
    with pytest.raises(UserError, match=rf"{path} line 2: not valid JSON \(Expecting value at column 26\)$"):
        _rows(path)
    rows, bad = _rows(path, skip=True)
    assert len(rows) == 1 and bad.count == 2
    assert bad.first == f"{path} line 2: not valid JSON (Expecting value at column 26)"


def test_bad_json_file_csv_rows_and_encoding(tmp_path):
    (tmp_path / "d.json").write_text('[\n {"input": "a"},\n {"input": }\n]')
    with pytest.raises(UserError, match=r"d.json line 3: not valid JSON \(Expecting value at column 12\)"):
        _rows(tmp_path / "d.json")
    (tmp_path / "d.csv").write_text("input,output\na,b\na,b,c\n")
    with pytest.raises(UserError, match=r"d.csv line 3: has 3 fields but the header has 2"):
        _rows(tmp_path / "d.csv")
    (tmp_path / "latin.jsonl").write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "b"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl line 2: not UTF-8 text \(invalid continuation byte\)"):
        _rows(tmp_path / "latin.jsonl")
    (tmp_path / "latin.csv").write_bytes(b"input,output\na,b\nc,d\ncaf\xe9,b\n")
    with pytest.raises(UserError, match=r"latin.csv line 4: not UTF-8 text"):
        _rows(tmp_path / "latin.csv")


def test_empty_file_and_file_of_bad_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no rows"):
        _examples(tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": 1}, {"input": "b", "output": ""}])
    with pytest.raises(UserError, match=r"d.jsonl line 1: field 'output' must be text, got int$"):
        _examples(path)
    with pytest.raises(UserError, match=r"d.jsonl: no usable examples \(first problem: .*line 1: field 'output' must"):
        _examples(path, skip_bad_rows=True)


def test_skip_bad_rows_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"input": "a", "output": "b"}\nnot json\n[1]\n{"input": "c", "output": null}\n{"input": "d", "output": "e"}\n'
    )
    assert len(_examples(path, skip_bad_rows=True)) == 2
    _, bad = _rows(path, skip=True)
    assert bad.count == 2  # the reader's share: lines that are not JSON objects


# --- hub datasets (no network in tests: the failure must be clear) ------------------------------------------


def test_hub_dataset_spec_and_offline_failure():
    source = open_source("someorg/somedata:en@train[:10%]", "train")
    assert (source.repo, source.subset, source.split) == ("someorg/somedata", "en", "train[:10%]")
    assert open_source("someorg/somedata", "validation").split == "validation"
    with pytest.raises(
        UserError,
        match=r"someorg/somedata:en@train\[:10%\]: not a local file or folder, and loading "
        r"it from the Hugging Face hub failed \(ConnectionError: .*org/name\[:subset\]",
    ):
        list(source.rows(BadRows(False)))


def test_config_accepts_hub_specs_and_rejects_missing_files(tmp_path):
    cfg = resolve(flags={"train_data": "someorg/somedata:en@train[:90%]", "val_data": "someorg/somedata@train[90%:]"})
    assert cfg.config.train_data == "someorg/somedata:en@train[:90%]"
    with pytest.raises(UserError, match=r"train_data = 'nowhere/data.jsonl' \(from --train-data\): file not found"):
        resolve(flags={"train_data": "nowhere/data.jsonl"})
