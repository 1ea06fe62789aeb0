"""Parsers of the three trace formats. Each yields (line number, TraceRequest with absolute
arrival); `parse_file` picks the parser, rebases arrivals to the first request and turns every
problem into a one-line TraceError naming the file and line."""
from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import lzma
import math
import pathlib
from typing import Iterator, TextIO

from pdserve.traces import TraceError, TraceRequest

PLAIN_COLUMNS = ("timestamp_s", "input_tokens", "output_tokens", "session_id")


class _RowError(Exception):
    """Raised by a parser for one row; parse_file adds file and line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def parse_file(path: pathlib.Path, limit: int | None) -> list[TraceRequest]:
    rows: list[TraceRequest] = []
    try:
        with _open_text(path) as f:
            for _line, row in _parser_for(path, f)(f):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    except _RowError as exc:
        raise TraceError(f"{path}:{exc.line}: {exc}") from None
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise TraceError(f"{path}: no requests in the trace")
    rows.sort(key=lambda r: r.arrival_s)          # stable: equal times keep file order
    t0 = rows[0].arrival_s
    return [TraceRequest(r.arrival_s - t0, r.input_tokens, r.output_tokens, r.block_hashes, r.session_id)
            for r in rows]


def _open_text(path: pathlib.Path) -> TextIO:
    if path.suffix == ".xz":
        return io.TextIOWrapper(lzma.open(path), encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _parser_for(path: pathlib.Path, f: TextIO):
    name = path.name.removesuffix(".xz").removesuffix(".gz")
    first = f.readline()
    f.seek(0)
    if name.endswith(".jsonl") or first.lstrip().startswith("{"):
        return _mooncake_rows
    if first.startswith("TIMESTAMP"):
        return _azure_rows
    return _plain_rows


def _count(value, line: int, what: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise _RowError(line, f"{what} must be an integer, got {value!r}") from None
    if n < minimum:
        raise _RowError(line, f"{what} must be at least {minimum}, got {n}")
    return n


def _seconds(value, line: int, what: str, scale: float = 1.0) -> float:
    try:
        t = float(value) * scale
    except (TypeError, ValueError):
        raise _RowError(line, f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise _RowError(line, f"{what} must be a finite number >= 0, got {value!r}")
    return t


def _mooncake_rows(f: TextIO) -> Iterator[tuple[int, TraceRequest]]:
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _RowError(line, f"not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise _RowError(line, "expected a JSON object per line")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in row]
        if missing:
            raise _RowError(line, f"missing field(s) {', '.join(missing)}")
        hashes = row.get("hash_ids", [])
        if not isinstance(hashes, list) or not all(isinstance(h, int) for h in hashes):
            raise _RowError(line, "hash_ids must be a list of integers")
        yield line, TraceRequest(_seconds(row["timestamp"], line, "timestamp (ms)", 1e-3),
                                 _count(row["input_length"], line, "input_length", 1),
                                 _count(row["output_length"], line, "output_length", 0), tuple(hashes))


def _azure_rows(f: TextIO) -> Iterator[tuple[int, TraceRequest]]:
    reader = csv.DictReader(f)
    missing = [k for k in ("TIMESTAMP", "ContextTokens", "GeneratedTokens") if k not in (reader.fieldnames or [])]
    if missing:
        raise _RowError(1, f"Azure CSV header lacks {', '.join(missing)}")
    for row in reader:
        line = reader.line_num
        try:   # 7 fractional digits in the trace; fromisoformat takes at most 6
            ts = dt.datetime.fromisoformat((row["TIMESTAMP"] or "")[:26]).timestamp()
        except ValueError:
            raise _RowError(line, f"TIMESTAMP is not a date and time: {row['TIMESTAMP']!r}") from None
        yield line, TraceRequest(ts, _count(row["ContextTokens"], line, "ContextTokens", 1),
                                 _count(row["GeneratedTokens"], line, "GeneratedTokens", 0))


def _plain_rows(f: TextIO) -> Iterator[tuple[int, TraceRequest]]:
    reader = csv.reader(f)
    for fields in reader:
        line = reader.line_num
        if not fields or not "".join(fields).strip():
            continue
        if line == 1 and fields[0].strip() == PLAIN_COLUMNS[0]:
            if tuple(c.strip() for c in fields) not in (PLAIN_COLUMNS[:3], PLAIN_COLUMNS):
                raise _RowError(line, f"header must be {','.join(PLAIN_COLUMNS[:3])}[,session_id]")
            continue
        if len(fields) not in (3, 4):
            raise _RowError(line, f"expected {','.join(PLAIN_COLUMNS[:3])}[,session_id], got {len(fields)} fields")
        yield line, TraceRequest(_seconds(fields[0], line, "timestamp_s"), _count(fields[1], line, "input_tokens", 1),
                                 _count(fields[2], line, "output_tokens", 0),
                                 session_id=fields[3].strip() if len(fields) == 4 else "")
