"""Every shape and every file type trains end to end (a few steps of the tiny model each)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from loratune import TrainConfig, train

N = 8


def _chat(i):
    return [
        {"role": "user", "content": f"order {i} mugs"},
        {"role": "assistant", "content": f"quantity {i}"},
        {"role": "user", "content": "city?"},
        {"role": "assistant", "content": "leeds"},
    ]


def _write(folder, kind):
    """N rows of one shape in one file type; returns the path to give as train_data."""
    if kind == "jsonl_input_output":
        return write_jsonl(
            folder / "d.jsonl", [{"input": f"send {i} mugs", "output": f"quantity {i}"} for i in range(N)]
        )
    if kind == "json_alpaca":
        rows = [{"instruction": "extract", "input": f"send {i} lamps", "output": f"lamp {i}"} for i in range(N)]
        (folder / "d.json").write_text(json.dumps(rows))
        return str(folder / "d.json")
    if kind == "csv_prompt_completion":
        (folder / "d.csv").write_text("prompt,completion\n" + "".join(f'"order {i}, blue",red {i}\n' for i in range(N)))
        return str(folder / "d.csv")
    if kind == "parquet_messages":
        pq.write_table(pa.Table.from_pylist([{"messages": _chat(i)} for i in range(N)]), folder / "d.parquet")
        return str(folder / "d.parquet")
    if kind == "jsonl_text":
        return write_jsonl(folder / "d.jsonl", [{"text": "order lamp blue red " * (i + 1)} for i in range(N)])
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["jsonl_input_output", "json_alpaca", "csv_prompt_completion", "parquet_messages", "jsonl_text"]
)
def test_each_shape_and_file_type_trains(tiny_model, tmp_path, kind):
    summary = train(_config(tiny_model, tmp_path, _write(tmp_path, kind)))
    _check(summary, tmp_path)


def test_folder_of_files_trains(tiny_model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    roles = {"user": "human", "assistant": "gpt"}
    write_jsonl(
        folder / "a.jsonl",
        [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in _chat(i)]} for i in range(4)],
    )
    (folder / "b.json").write_text(
        json.dumps(
            [
                {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in _chat(i)]}
                for i in range(4, 8)
            ]
        )
    )
    summary = train(_config(tiny_model, tmp_path, str(folder)))
    _check(summary, tmp_path)


def test_instruction_data_on_a_model_without_a_template_trains(tiny_plain_model, tmp_path):
    summary = train(_config(tiny_plain_model, tmp_path, _write(tmp_path, "json_alpaca")))
    _check(summary, tmp_path)


def _config(model, tmp_path, data):
    return TrainConfig(
        model=model,
        train_data=data,
        val_ratio=0.25,
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        precision="fp32",
        device="cpu",
        max_length=64,
    )


def _check(summary, tmp_path):
    assert summary["steps"] == 2 and summary["target_tokens"] > 0
    assert math.isfinite(summary["last_val_loss"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
