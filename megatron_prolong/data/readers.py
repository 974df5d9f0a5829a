"""Streaming record readers for JSONL (plain, .gz, .zst) and parquet inputs.

Readers yield ``(source, line_number, payload)`` where payload is the raw JSON line (parsed
later, in a worker) or an already-decoded dict (parquet). Memory stays bounded: nothing is read
ahead beyond one line / one parquet record batch.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import Any, Iterator, Union

Payload = Union[str, dict]


class BadRecordError(ValueError):
    """A malformed input record; the message names file and line."""


def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        for h in hits:
            if os.path.isdir(h):
                files += sorted(os.path.join(h, f) for f in os.listdir(h)
                                if f.endswith((".jsonl", ".json", ".gz", ".zst", ".parquet")))
            else:
                files.append(h)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise FileNotFoundError(f"input files not found: {missing or patterns}")
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def iter_records(paths: list[str]) -> Iterator[tuple[str, int, Payload]]:
    for path in paths:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            line = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    line += 1
                    yield path, line, row
            continue
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield path, line_no, line


def parse_record(source: str, line_no: int, payload: Payload) -> dict[str, Any]:
    if isinstance(payload, dict):
        return payload
    try:
        rec = json.loads(payload)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{source}:{line_no}: malformed JSON ({e.msg} at column {e.colno})"
                             ) from None
    if not isinstance(rec, dict):
        raise BadRecordError(f"{source}:{line_no}: expected a JSON object, got "
                             f"{type(rec).__name__}")
    return rec


def get_field(rec: dict, key: str, source: str, line_no: int) -> Any:
    """Field lookup; dotted keys reach into nested objects (e.g. 'meta.repo')."""
    cur: Any = rec
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BadRecordError(f"{source}:{line_no}: no field {key!r} (keys: "
                                 f"{sorted(rec)[:10]}); set the field name option")
        cur = cur[part]
    return cur
