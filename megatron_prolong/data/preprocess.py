"""Tokenize JSONL/parquet records into a megatron indexed dataset (the engine behind
tools/preprocess_data.py).

Flow: a reader streams records -> batches go to N worker processes (at most 2*N batches in
flight, so memory is bounded whatever the input size) -> results come back in input order ->
either written straight away (one document per record, EOD appended) or, with ``group_key``,
spilled to a temporary token file and afterwards concatenated per group (groups in order of first
appearance, records in input order or sorted by ``group_sort_key``) -> length filter -> atomic
rename of .bin/.idx (+ stats JSON) when complete.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .chat import ChatFormatError, render_chat
from .indexed import IndexedWriter
from .readers import BadRecordError, expand_inputs, get_field, iter_records, parse_record
from .tokenizer import Tokenizer, build_tokenizer


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_kind: str = "byte"
    tokenizer_path: Optional[str] = None
    text_key: str = "text"
    sft: bool = False
    messages_key: str = "messages"
    group_key: Optional[str] = None
    group_sort_key: Optional[str] = None
    group_separator: str = "\n\n"
    min_doc_length: int = 1
    append_eod: bool = True  # pre-training only; SFT conversations end with <|eot_id|>
    prepend_bos: bool = False  # pre-training only; SFT conversations start with BOS anyway
    workers: int = 1
    batch_size: int = 256
    skip_bad_lines: bool = False
    progress: bool = True
    stats_path: Optional[str] = None  # default: <output_prefix>.stats.json


@dataclass
class Stats:
    files: int = 0
    records_read: int = 0
    docs_kept: int = 0
    tokens_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    length_histogram: Counter = field(default_factory=Counter)  # "<2^k" -> kept docs
    groups: int = 0
    elapsed_s: float = 0.0
    tokenize_tokens: int = 0  # tokens produced by workers, before filtering

    def keep(self, n: int) -> None:
        self.docs_kept += 1
        self.tokens_kept += n
        self.length_histogram[f"<2^{int(n).bit_length()}"] += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dropped"] = dict(self.dropped)
        d["length_histogram"] = dict(sorted(self.length_histogram.items(),
                                            key=lambda kv: int(kv[0][3:])))
        t = max(self.elapsed_s, 1e-9)
        d["docs_per_s"] = self.records_read / t
        d["tokens_per_s"] = self.tokenize_tokens / t
        return d


# ---- worker side --------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PreprocessConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["tok"] = build_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_path)


def _process_one(cfg: PreprocessConfig, tok: Tokenizer, src: str, line: int, payload) -> tuple:
    """-> (tokens or None, mask or None, group key, sort key, drop reason or error text)."""
    try:
        rec = parse_record(src, line, payload)
        gkey = str(get_field(rec, cfg.group_key, src, line)) if cfg.group_key else None
        skey = str(get_field(rec, cfg.group_sort_key, src, line)) if cfg.group_sort_key else ""
        if cfg.sft:
            try:
                ids, mask = render_chat(tok, get_field(rec, cfg.messages_key, src, line))
            except ChatFormatError as e:
                raise BadRecordError(f"{src}:{line}: {e}") from None
        else:
            text = get_field(rec, cfg.text_key, src, line)
            if not isinstance(text, str):
                raise BadRecordError(f"{src}:{line}: field {cfg.text_key!r} is "
                                     f"{type(text).__name__}, expected a string")
            if not text.strip():
                return None, None, gkey, skey, "empty"
            ids, mask = tok.encode_np(text), None
        return ids, mask, gkey, skey, None
    except BadRecordError as e:
        return None, None, None, None, "bad_record:" + str(e)


def _process_batch(batch: list) -> list:
    cfg, tok = _WORKER["cfg"], _WORKER["tok"]
    return [_process_one(cfg, tok, *item) for item in batch]


def _batched(it: Iterator, n: int, max_chars: int = 1 << 20) -> Iterator[list]:
    """Batches of at most n records or ~max_chars characters (long documents: small batches,
    so the work spreads over the workers and memory in flight stays bounded)."""
    batch, chars = [], 0
    for x in it:
        batch.append(x)
        chars += len(x[2]) if isinstance(x[2], str) else 0
        if len(batch) == n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_results(cfg: PreprocessConfig, tok: Tokenizer, batches: Iterator[list]
                     ) -> Iterator[list]:
    """Worker results in input order, never more than 2*workers batches in flight."""
    if cfg.workers <= 1:  # in-process: reuse the already loaded tokenizer
        _WORKER["cfg"], _WORKER["tok"] = cfg, tok
        for b in batches:
            yield _process_batch(b)
        return
    with mp.get_context("fork").Pool(cfg.workers, _init_worker, (cfg,)) as pool:
        window: deque = deque()
        for b in batches:
            window.append(pool.apply_async(_process_batch, (b,)))
            if len(window) >= 2 * cfg.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.t0, self.last = enabled, time.time(), 0.0

    def update(self, stats: Stats, final: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not final and now - self.last < 1.0):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r{stats.records_read:,} docs ({stats.records_read / dt:,.0f}/s)  "
                         f"{stats.tokenize_tokens:,} tokens ({stats.tokenize_tokens / dt:,.0f}/s)"
                         f"  kept {stats.docs_kept:,}" + ("\n" if final else ""))
        sys.stderr.flush()


class _GroupSpill:
    """Tokens of grouped records on disk (bounded memory); group order kept in small arrays."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.key_ids: dict[str, int] = {}
        self.rec_key: list[int] = []
        self.rec_sort: list[str] = []
        self.rec_len: list[int] = []

    def add(self, ids: np.ndarray, gkey: str, skey: str) -> None:
        self.f.write(np.asarray(ids, dtype=np.int32).tobytes())
        self.rec_key.append(self.key_ids.setdefault(gkey, len(self.key_ids)))
        self.rec_sort.append(skey)
        self.rec_len.append(len(ids))

    def groups(self) -> Iterator[list[np.ndarray]]:
        self.f.close()
        if not self.rec_len:
            return
        data = np.memmap(self.path, dtype=np.int32, mode="r")
        starts = np.concatenate([[0], np.cumsum(self.rec_len)])
        keys = np.asarray(self.rec_key)
        order = np.lexsort((np.arange(len(keys)), np.asarray(self.rec_sort), keys))
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for members in np.split(order, bounds):
            yield [data[starts[r]:starts[r + 1]] for r in members]
        del data


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole conversion; returns the stats dict (also written as JSON)."""
    if cfg.sft and cfg.group_key:
        raise ValueError("--group-key cannot be combined with --sft (conversations stay apart)")
    files = expand_inputs(cfg.inputs)
    tok = build_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_path)
    stats, progress, t0 = Stats(files=len(files)), _Progress(cfg.progress), time.time()
    stats_path = cfg.stats_path or cfg.output_prefix + ".stats.json"
    eod = np.asarray([tok.eos_id] if cfg.append_eod else [], dtype=np.int32)
    bos = np.asarray([tok.bos_id] if cfg.prepend_bos else [], dtype=np.int32)
    spill = _GroupSpill(cfg.output_prefix + f".tmp-{os.getpid()}.groups") if cfg.group_key else None

    def emit(writer: IndexedWriter, ids: np.ndarray, mask: Optional[np.ndarray]) -> None:
        if len(ids) < cfg.min_doc_length:
            stats.dropped["too_short"] += 1
            return
        writer.add(ids, mask)
        stats.keep(len(ids))

    try:
        with IndexedWriter(cfg.output_prefix, tok.vocab_size, with_mask=cfg.sft) as writer:
            batches = _batched(iter_records(files), cfg.batch_size)
            for results in _ordered_results(cfg, tok, batches):
                for ids, mask, gkey, skey, reason in results:
                    stats.records_read += 1
                    if reason is not None:
                        if reason.startswith("bad_record:"):
                            if not cfg.skip_bad_lines:
                                raise BadRecordError(reason[len("bad_record:"):] +
                                                     "  (use --skip-bad-lines to count and skip)")
                            reason = "bad_record"
                        stats.dropped[reason] += 1
                        continue
                    stats.tokenize_tokens += len(ids)
                    if spill is not None:
                        spill.add(ids, gkey, skey)
                    else:
                        # SFT: the conversation ends with <|eot_id|>, as in the chat template.
                        emit(writer, ids if cfg.sft else np.concatenate([bos, ids, eod]), mask)
                progress.update(stats)
            if spill is not None:
                sep = tok.encode_np(cfg.group_separator) if cfg.group_separator else None
                for members in spill.groups():
                    stats.groups += 1
                    parts = []
                    for i, m in enumerate(members):
                        if i and sep is not None and len(sep):
                            parts.append(sep)
                        parts.append(m)
                    emit(writer, np.concatenate([bos] + parts + [eod]), None)
            if stats.docs_kept == 0:
                raise ValueError(f"no document kept from {files} (dropped: "
                                 f"{dict(stats.dropped)}); check --text-key and "
                                 "--min-doc-length")
    finally:
        if spill is not None:
            spill.f.close()
            if os.path.exists(spill.path):
                os.remove(spill.path)
    stats.elapsed_s = time.time() - t0
    progress.update(stats, final=True)
    out = stats.to_dict()
    out["tokenizer"] = tok.describe()
    out["output_prefix"] = cfg.output_prefix
    tmp = stats_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, stats_path)
    return out
