"""Reading rows from JSON Lines, JSON, CSV, Parquet, a folder of them, or a hub dataset.

Each row comes with its origin ("data.jsonl line 12"), so every later complaint can say where.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


class BadRows:
    """Counts malformed rows when the user asked to skip them; otherwise stops at the first."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.first: str | None = None

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise UserError(f"{where}: {problem} (use --skip-bad-rows to skip such rows)")
        self.count += 1
        self.first = self.first or f"{where}: {problem}"


def read_rows(source: str, bad: BadRows, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (origin, row) for every row of `source`."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_TYPES)
        if not files:
            raise UserError(f"{source}: folder has no data files ({', '.join(FILE_TYPES)})")
        for f in files:
            yield from _read_file(f, bad)
    elif path.is_file():
        yield from _read_file(path, bad)
    else:
        yield from _read_hub(source, split)


def _read_file(path: Path, bad: BadRows) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = path.suffix.lower()
    if kind in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, bad)
    elif kind == ".json":
        yield from _read_json(path, bad)
    elif kind == ".csv":
        yield from _read_csv(path)
    elif kind == ".parquet":
        yield from _read_parquet(path)
    else:
        raise UserError(f"{path}: unsupported file type {kind or '(none)'}; use one of {', '.join(FILE_TYPES)}")


def _read_jsonl(path: Path, bad: BadRows):
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    bad(where, f"expected a JSON object, got {type(row).__name__}")
                    continue
                yield where, row
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path, bad: BadRows):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers with one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records (or an object holding one list)")
    for i, row in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(row, dict):
            bad(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield where, row


def _read_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path} line {reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read Parquet ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _read_hub(name: str, split: str):
    """A dataset on the Hugging Face hub: `user/name`, optionally `user/name:subset`."""
    import datasets

    repo, _, subset = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, subset or None, split=split)
    except Exception as e:  # offline, missing, or private: all say the same to the user
        raise UserError(
            f"{name}: not a local file, and loading it from the Hugging Face hub failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row
