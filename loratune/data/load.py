"""Data sources: JSON Lines, JSON, CSV/TSV, Parquet, a folder of them, or a Hugging Face hub dataset.

Each row comes with its origin ("data.jsonl line 12"), so every later complaint can say where. Lines count
from 1 as in an editor; JSON records and Parquet/hub rows count from 0, as their index in Python.
Each source also has a digest of its content, which keys the tokenization cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from ..core.errors import BadRowError, UserError, first_line
from ..core.files import file_digest

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
Rows = Iterator[tuple[str, dict[str, Any]]]


class BadRows:
    """Counts malformed rows when the user asked to skip them; otherwise stops at the first."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.first: str | None = None

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise BadRowError(f"{where}: {problem}")
        self.count += 1
        self.first = self.first or f"{where}: {problem}"


def open_source(spec: str, split: str):
    """A local file or folder, else a hub dataset `org/name[:subset][@split]` (`split` when none is named)."""
    path = Path(spec).expanduser()
    if path.exists():
        return FileSource(path)
    if path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")):  # meant as a local file
        raise UserError(f"{spec}: file not found")
    name, _, named_split = spec.partition("@")
    repo, _, subset = name.partition(":")
    return HubSource(repo, subset or None, named_split or split)


def read_rows(spec: str, bad: BadRows, split: str = "train") -> Rows:
    """(origin, row) for every row of a source."""
    return open_source(spec, split).rows(bad)


class FileSource:
    def __init__(self, path: Path):
        self.name = str(path)
        if path.is_dir():
            # Hidden files and folders (.git, .ipynb_checkpoints) are never data.
            self.files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in FILE_TYPES and not _hidden(p.relative_to(path))
            )
            if not self.files:
                raise UserError(f"{path}: folder has no data files ({', '.join(FILE_TYPES)})")
        else:
            if path.suffix.lower() not in FILE_TYPES:
                raise UserError(
                    f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(FILE_TYPES)}"
                )
            self.files = [path]
        if unreadable := [f for f in self.files if not os.access(f, os.R_OK)]:
            raise UserError(f"{unreadable[0]}: cannot be read (permission denied)")
        self.root = path

    def digest(self) -> str:
        """Content and place: origins in messages name the files, so a copy elsewhere is tokenized afresh."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for f in self.files:
            h.update(f"{f.relative_to(self.root) if f != self.root else f.name}|{file_digest(f)}\n".encode())
        return h.hexdigest()

    def rows(self, bad: BadRows) -> Rows:
        for f in self.files:
            kind = f.suffix.lower()
            if kind in (".jsonl", ".ndjson"):
                yield from _read_jsonl(f, bad)
            elif kind == ".json":
                yield from _read_json(f, bad)
            elif kind in (".csv", ".tsv"):
                yield from _read_csv(f, bad, delimiter="\t" if kind == ".tsv" else ",")
            else:
                yield from _read_parquet(f)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        raise UserError(f"{path} line {line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _read_jsonl(path: Path, bad: BadRows) -> Rows:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, path, n)
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line.rstrip("\r\n"))  # so error columns count within the line
            except json.JSONDecodeError as e:
                bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                bad(where, f"expected a JSON object, got {type(row).__name__}")
                continue
            yield where, row


def _read_json(path: Path, bad: BadRows) -> Rows:
    try:
        data = json.loads(_decode(path.read_bytes(), path, 1))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a file named .json: JSON Lines after all
            yield from _read_jsonl(path, bad)
            return
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
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


def _read_csv(path: Path, bad: BadRows, delimiter: str) -> Rows:
    csv.field_size_limit(2**31 - 1)  # long answers are normal in training data
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), path, 1), newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    if len(set(header)) != len(header):
        raise UserError(f"{path} line 1: the header names a column twice ({', '.join(header)})")
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad(f"{path} line {reader.line_num}", f"not valid CSV ({e})")
            continue
        where = f"{path} line {reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(header):
            bad(where, f"has {len(fields)} fields but the header has {len(header)} (an unquoted {delimiter!r}?)")
            continue
        yield where, dict(zip(header, fields))


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    except (OSError, ValueError) as e:  # pyarrow's errors for a damaged or non-Parquet file
        raise UserError(f"{path}: cannot read Parquet ({e})") from None


class HubSource:
    """A dataset on the Hugging Face hub, loaded (and cached) by `datasets`."""

    def __init__(self, repo: str, subset: str | None, split: str):
        self.repo, self.subset, self.split = repo, subset, split
        self.name = f"{repo}{':' + subset if subset else ''}@{split}"

    @cached_property
    def dataset(self):
        import datasets

        try:
            return datasets.load_dataset(self.repo, self.subset, split=self.split)
        except Exception as e:  # offline, missing, private, unknown split: all mean the same to the user
            raise UserError(
                f"{self.name}: not a local file or folder, and loading it from the Hugging Face hub failed "
                f"({type(e).__name__}: {first_line(e)}). A hub dataset is written org/name[:subset][@split]; "
                "check the name and the network, or give a local file"
            ) from None

    def digest(self) -> str:
        return f"hub|{self.name}|{self.dataset._fingerprint}"

    def rows(self, bad: BadRows) -> Rows:
        for i, row in enumerate(self.dataset):
            yield f"{self.name} row {i}", row
