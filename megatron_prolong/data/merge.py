"""Join indexed datasets (the shards of a sharded preprocessing run) into one.

Documents, loss-mask companions and statistics are joined. Shards of an ungrouped run are
concatenated in order: the token bytes are copied file to file (``os.copy_file_range``, so the
kernel moves them) and the index is rebuilt from the shards' lengths with numpy. Shards of a
grouped run carry each document's first input position (``.order.npy``); their documents are
interleaved by it, which restores the order one process would have written. The output is
published like preprocessing's: temporary names, renamed into place, then a completion marker.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from ..atomic_file import write_text_atomically
from . import shards
from .indexed import (MASK_SUFFIX, _tmp_prefix, get_bin_path, get_idx_path, publish,
                      read_index, remove_pairs, write_index)

_COPY_CHUNK = 1 << 30


class MergeError(ValueError):
    """Inputs that cannot be merged (incomplete shard, mixed dtypes or tokenizers...)."""


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to the end of ``dst`` (both open files)."""
    try:
        while count > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(count, _COPY_CHUNK), offset)
            if n == 0:
                raise MergeError(f"{src.name}: shorter than its index says")
            offset, count = offset + n, count - n
        return
    except (AttributeError, OSError):  # no copy_file_range (other OS, some filesystems)
        pass
    src.seek(offset)
    while count > 0:
        buf = src.read(min(count, 1 << 24))
        if not buf:
            raise MergeError(f"{src.name}: shorter than its index says")
        dst.write(buf)
        count -= len(buf)


class _Part:
    def __init__(self, prefix: str, suffix: str = "") -> None:
        self.prefix = prefix + suffix
        self.dtype, self.lengths, self.docs = read_index(self.prefix)
        self.byte_starts = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths.astype(np.int64) * self.dtype.itemsize, out=self.byte_starts[1:])


def _document_plan(parts: list[_Part], orders: Optional[list[np.ndarray]]
                   ) -> list[tuple[int, int, int]]:
    """Runs (part, first document, end document) to copy, in output order."""
    if orders is None:
        return [(k, 0, len(p.docs) - 1) for k, p in enumerate(parts)]
    part_of = np.concatenate([np.full(len(o), k, dtype=np.int64) for k, o in enumerate(orders)])
    local = np.concatenate([np.arange(len(o), dtype=np.int64) for o in orders])
    positions = np.concatenate(orders)
    perm = np.argsort(positions, kind="stable")
    if len(perm) > 1 and (np.diff(positions[perm]) == 0).any():
        raise MergeError("two shards hold a document of the same group: the shards come from "
                         "different runs; redo them with one command line")
    runs: list[tuple[int, int, int]] = []
    for k, d in zip(part_of[perm].tolist(), local[perm].tolist()):
        if runs and runs[-1][0] == k and runs[-1][2] == d:
            runs[-1] = (k, runs[-1][1], d + 1)  # consecutive documents of one shard: one copy
        else:
            runs.append((k, d, d + 1))
    return runs


def _merge_files(parts: list[_Part], runs: list[tuple[int, int, int]], tmp: str) -> None:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise MergeError(f"inputs have different token dtypes {sorted(map(str, dtypes))} "
                         "(tokenized with different vocabularies); merge like with like")
    lengths, doc_index, n_seq = [], [np.zeros(1, dtype=np.int64)], 0
    files = [open(get_bin_path(p.prefix), "rb") for p in parts]
    try:
        with open(get_bin_path(tmp), "wb", buffering=0) as out:
            for k, d0, d1 in runs:
                p = parts[k]
                s0, s1 = int(p.docs[d0]), int(p.docs[d1])
                _copy_range(files[k], out, int(p.byte_starts[s0]),
                            int(p.byte_starts[s1] - p.byte_starts[s0]))
                lengths.append(np.asarray(p.lengths[s0:s1]))
                doc_index.append(np.asarray(p.docs[d0 + 1:d1 + 1], dtype=np.int64) - s0 + n_seq)
                n_seq += s1 - s0
    finally:
        for f in files:
            f.close()
    write_index(get_idx_path(tmp), dtypes.pop(),
                np.concatenate(lengths) if lengths else np.zeros(0, np.int32),
                np.concatenate(doc_index))


def merge_stats(stats: Sequence[dict]) -> dict:
    """Counts summed over shards (records read, kept, dropped by reason, length histogram,
    groups); elapsed is the slowest shard's; the tokenizer must be the same everywhere."""
    tokenizers = {json.dumps(s.get("tokenizer"), sort_keys=True) for s in stats}
    if len(tokenizers) > 1:
        raise MergeError(f"inputs were tokenized with different tokenizers: {sorted(tokenizers)}")
    grouped = all((s.get("shard") or {}).get("assignment") == "group-hash" for s in stats)
    out: dict = {"files": max(s.get("files", 0) for s in stats) if grouped else
                 sum((s.get("shard") or {}).get("files_read", s.get("files", 0)) for s in stats)}
    for key in ("records_read", "docs_kept", "tokens_kept", "groups", "tokenize_tokens"):
        out[key] = sum(int(s.get(key, 0)) for s in stats)
    for key in ("dropped", "length_histogram"):
        total: Counter = Counter()
        for s in stats:
            total.update(s.get(key, {}))
        out[key] = dict(total)
    out["length_histogram"] = dict(sorted(out["length_histogram"].items(),
                                          key=lambda kv: int(kv[0][3:])))
    out["elapsed_s"] = max(float(s.get("elapsed_s", 0.0)) for s in stats)
    out["tokenizer"] = stats[0].get("tokenizer")
    out["merged_from"] = len(stats)
    return out


def merge_datasets(inputs: Sequence[str], output_prefix: str, force: bool = False) -> dict:
    """Join ``inputs`` (indexed-dataset prefixes, in order) into ``output_prefix``; returns the
    merged stats (written as ``output_prefix.stats.json``)."""
    if not inputs:
        raise MergeError("nothing to merge: no input datasets")
    markers = [shards.read_marker(p) for p in inputs]
    job = json.dumps({"inputs": [os.path.abspath(p) for p in inputs],
                      "markers": [m and m.get("fingerprint") for m in markers]}, sort_keys=True)
    fingerprint = shards.fingerprint({"merge": job}, [f for p in inputs for f in
                                                      (get_idx_path(p), get_bin_path(p))
                                                      if os.path.exists(f)])
    if not force and shards.is_complete(output_prefix, fingerprint):
        with open(output_prefix + ".stats.json") as f:
            return {**json.load(f), "skipped": True}
    parts = [_Part(p) for p in inputs]
    has_mask = [os.path.exists(get_idx_path(p + MASK_SUFFIX)) for p in inputs]
    if any(has_mask) and not all(has_mask):
        raise MergeError("some inputs have a loss mask (.lossmask) and some do not: "
                         + ", ".join(p for p, m in zip(inputs, has_mask) if not m))
    order_paths = [p + shards.ORDER_SUFFIX for p in inputs]
    has_order = [os.path.exists(p) for p in order_paths]
    if any(has_order) and not all(has_order):
        raise MergeError("some inputs are grouped shards (.order.npy) and some are not")
    orders = None
    if all(has_order):
        orders = [np.load(p) for p in order_paths]
        for p, o, part in zip(inputs, orders, parts):
            if len(o) != len(part.docs) - 1:
                raise MergeError(f"{p}{shards.ORDER_SUFFIX}: {len(o)} entries for "
                                 f"{len(part.docs) - 1} documents; redo this shard")
    runs = _document_plan(parts, orders)
    shards.start_over(output_prefix)
    tmp = _tmp_prefix(output_prefix)
    pairs = [(tmp, output_prefix)]
    try:
        _merge_files(parts, runs, tmp)
        if all(has_mask):  # inputs is not empty (checked above)
            _merge_files([_Part(p, MASK_SUFFIX) for p in inputs], runs, tmp + MASK_SUFFIX)
            pairs.append((tmp + MASK_SUFFIX, output_prefix + MASK_SUFFIX))
    except BaseException:
        remove_pairs((tmp, tmp + MASK_SUFFIX))
        raise
    publish(pairs)
    stats = []
    for p in inputs:
        path = p + ".stats.json"
        if os.path.exists(path):
            with open(path) as f:
                stats.append(json.load(f))
    n_docs = sum(len(part.docs) - 1 for part in parts)
    out = merge_stats(stats) if len(stats) == len(inputs) else {"docs_kept": n_docs}
    out["output_prefix"] = output_prefix
    out["inputs"] = list(inputs)
    write_text_atomically(output_prefix + ".stats.json", json.dumps(out, indent=2),
                          tmp=f"{tmp}.stats.json")
    shards.write_marker(output_prefix, fingerprint, {"merged": list(inputs)})
    return out


def merge_shards(prefix: str, num_shards: Optional[int] = None,
                 output_prefix: Optional[str] = None, force: bool = False) -> dict:
    """Merge the N shard outputs of ``prefix`` after checking each one is complete."""
    output_prefix = output_prefix or prefix
    try:
        inputs = shards.find_shards(prefix, num_shards)
    except FileNotFoundError:
        if not force and shards.is_complete(output_prefix):  # merged, shards since removed
            with open(output_prefix + ".stats.json") as f:
                return {**json.load(f), "skipped": True}
        raise
    incomplete = [i for i, p in enumerate(inputs) if not shards.is_complete(p)]
    if incomplete:
        shown = ", ".join(map(str, incomplete[:20])) + (" ..." if len(incomplete) > 20 else "")
        raise MergeError(f"{len(incomplete)} of {len(inputs)} shards of {prefix!r} are not "
                         f"complete (index {shown}); rerun those array tasks (complete shards "
                         "are skipped), then merge again")
    jobs = {(shards.read_marker(p) or {}).get("job") for p in inputs}
    if len(jobs) > 1:
        raise MergeError(f"the shards of {prefix!r} come from different preprocessing runs "
                         "(their inputs or options differ); redo the stale ones with the same "
                         "command line")
    return merge_datasets(inputs, output_prefix, force)
