"""The largest token id of an indexed dataset, scanned once and cached beside it.

A token id >= the model's vocabulary (data tokenized with another tokenizer) must stop a run at
start, not when the sampler first reaches the bad document hours later. Reading every token at
every start would cost minutes at ProLong's scale (20B tokens = 80 GB of int32), so the maximum
is computed once per `.bin` and kept in `<prefix>.max_token_id.json`, keyed by the file's size
and modification time (a rewritten dataset is scanned again). Where the dataset directory is
read-only the record goes to ~/.cache/megatron_prolong/ instead.

The index makes the common cases free: its dtype bounds every id (uint8 data can never exceed
a 512-token vocabulary, uint16 never a 65,536 one). Signed dtypes are scanned through their
unsigned view, so a negative id shows up as a huge one and is refused too.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Optional

import numpy as np

from ..atomic_file import write_text_atomically
from .indexed import DataFileError, get_bin_path, read_index

CACHE_SUFFIX = ".max_token_id.json"
_CHUNK = 1 << 26  # tokens per read: bounded memory for any file size
_ANNOUNCE_BYTES = 1 << 30


def _unsigned(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(f"u{dtype.itemsize}") if dtype.kind == "i" else dtype


def _stamp(bin_path: str) -> dict:
    st = os.stat(bin_path)
    return {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns}


def _cache_paths(prefix: str) -> list[str]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(os.path.abspath(prefix).encode()).hexdigest()[:16]
    return [prefix + CACHE_SUFFIX,
            os.path.join(home, "megatron_prolong", "max_token_id", key + ".json")]


def _read_cache(prefix: str, stamp: dict) -> Optional[int]:
    for path in _cache_paths(prefix):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and all(record.get(k) == v for k, v in stamp.items()):
            return int(record["max_token_id"])
    return None


def _write_cache(prefix: str, stamp: dict, value: int) -> None:
    for path in _cache_paths(prefix):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_text_atomically(path, json.dumps({"max_token_id": value, **stamp}))
            return
        except OSError:
            continue  # read-only dataset directory: try the user cache; else do without


def _tokens(prefix: str) -> tuple[np.memmap, np.ndarray, np.dtype]:
    """(all tokens as unsigned ints, first-token offset of each sequence, stored dtype)."""
    dtype, lengths, _ = read_index(prefix)
    dtype = np.dtype(dtype)
    tokens = np.memmap(get_bin_path(prefix), dtype=_unsigned(dtype), mode="r")
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return tokens, starts, dtype


def max_token_id(prefix: str) -> int:
    """Largest id in prefix.bin (negative ids in signed data count as huge); cached."""
    stamp = _stamp(get_bin_path(prefix))
    cached = _read_cache(prefix, stamp)
    if cached is not None:
        return cached
    tokens, _, _ = _tokens(prefix)
    if stamp["bin_bytes"] >= _ANNOUNCE_BYTES:
        print(f"checking the token ids of {prefix} ({stamp['bin_bytes'] / 2**30:.1f} GiB) once; "
              f"the result is cached in {prefix}{CACHE_SUFFIX}", file=sys.stderr, flush=True)
    value = 0
    for start in range(0, len(tokens), _CHUNK):
        value = max(value, int(tokens[start:start + _CHUNK].max()))
    _write_cache(prefix, stamp, value)
    return value


def _first_bad(prefix: str, vocab_size: int) -> tuple[int, int, int]:
    """(sequence, token id, sequence count) of the first id outside [0, vocab_size)."""
    tokens, starts, dtype = _tokens(prefix)
    for start in range(0, len(tokens), _CHUNK):
        bad = np.flatnonzero(tokens[start:start + _CHUNK] >= vocab_size)
        if len(bad):
            pos = start + int(bad[0])
            value = int(np.asarray(tokens[pos]).view(dtype))
            return int(np.searchsorted(starts, pos, side="right")) - 1, value, len(starts)
    raise AssertionError("unreachable: max_token_id said there is one")


def check_token_ids(prefix: str, vocab_size: int) -> None:
    """Raise DataFileError naming the file, the sequence and the id when any token id falls
    outside [0, vocab_size)."""
    dtype = np.dtype(read_index(prefix)[0])
    if dtype.kind == "u" and np.iinfo(dtype).max < vocab_size:
        return  # the dtype cannot hold an id outside the vocabulary
    if max_token_id(prefix) < vocab_size:
        return
    sequence, value, count = _first_bad(prefix, vocab_size)
    raise DataFileError(f"{prefix}: sequence {sequence} (of {count}) holds token id {value}, "
                        f"outside the vocabulary [0, {vocab_size}); the data was tokenized with "
                        "a different tokenizer than the one configured")
