"""Streaming record readers for JSONL (plain, .gz, .zst) and parquet inputs.

Readers yield ``(source, line_number, payload)`` where payload is the raw JSON line as bytes
(decoded and parsed later, in a worker, so invalid UTF-8 is reported with its file and line) or
an already-decoded dict (parquet). Lines are split on b"\\n" as JSON Lines defines them. Memory
stays bounded: nothing is read ahead beyond one line / one parquet record batch. A compressed
file that is corrupt or cut short stops the run with one error naming it (BadRecordError, never
skipped by --skip-bad-lines).

Text is made encodable: a lone UTF-16 surrogate (JSON allows "\\ud83d" on its own, no tokenizer
can encode it) becomes U+FFFD, which is what tiktoken (the llama3 tokenizer) does by itself; so
every tokenizer kind sees the same text.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from typing import Any, Iterator, Union

Payload = Union[bytes, str, dict]
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


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


def _open_lines(path: str) -> io.BufferedIOBase:
    """A binary stream of the (decompressed) file; iterating it yields lines ending in b"\\n"."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class _ZstdFrames(io.RawIOBase):
    """A .zst file decompressed frame after frame, 64 KB of it at a time. Unlike zstandard's
    stream_reader, which ends quietly with the part it could decode, an input cut short inside
    a frame raises."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")
        self._frame = None  # the decompressobj of the frame being read
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _decode(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # the next frame, if any, starts in what is left
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._file.read(1 << 16)
            if not data:
                if self._frame is not None:
                    raise self._zstd.ZstdError("the data ends inside a zstd frame (truncated)")
                return 0
            self._out, self._pos = self._decode(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


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
        line_no = 0
        try:
            with _open_lines(path) as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield path, line_no, line
        except _read_errors(path) as e:
            raise BadRecordError(f"{path}: unreadable after line {line_no} ({type(e).__name__}: "
                                 f"{e}); the file is corrupt or cut short: fetch or compress it "
                                 "again") from None


def _read_errors(path: str) -> tuple:
    """What reading an input raises when its (compressed) bytes are corrupt or cut short."""
    errors: tuple = (gzip.BadGzipFile, EOFError, zlib.error)
    if path.endswith((".zst", ".zstd")):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def parse_record(source: str, line_no: int, payload: Payload) -> dict[str, Any]:
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{source}:{line_no}: invalid UTF-8 (byte 0x{payload[e.start]:02x}"
                                 f" at byte {e.start + 1} of the line); re-encode the file as "
                                 "UTF-8") from None
        surrogates = _SURROGATE_ESCAPE.search(payload) is not None
    else:
        text, surrogates = payload, True
    try:
        rec = json.loads(text)
        if surrogates:
            rec = _without_lone_surrogates(rec)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{source}:{line_no}: malformed JSON ({e.msg} at column {e.colno})"
                             ) from None
    except RecursionError:  # '[[[[...' 200,000 deep: a bad line, not a crash
        raise BadRecordError(f"{source}:{line_no}: JSON nested too deeply (over "
                             f"{sys.getrecursionlimit()} levels)") from None
    if not isinstance(rec, dict):
        raise BadRecordError(f"{source}:{line_no}: expected a JSON object, got "
                             f"{type(rec).__name__}")
    return rec


def get_field(rec: dict, key: str, source: str, line_no: int,
              option: str = "the field name option") -> Any:
    """Field lookup; dotted keys reach into nested objects (e.g. 'meta.repo'). `option` is the
    command-line option that names the field (e.g. --text-key), for the error message."""
    cur: Any = rec
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BadRecordError(f"{source}:{line_no}: no field {key!r} (keys: "
                                 f"{sorted(rec)[:10]}); set {option} to the field that holds "
                                 "it")
        cur = cur[part]
    return cur


def _without_lone_surrogates(value: Any) -> Any:
    """Replace lone surrogates in every string of a parsed record with U+FFFD (what tiktoken
    does): they cannot be encoded as UTF-8, so no tokenizer can take them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value
