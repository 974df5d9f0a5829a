"""Tokenize JSONL/parquet records into a megatron indexed dataset (the engine behind
tools/preprocess_data.py).

Flow: a reader streams records -> batches go to N worker processes (at most 2*N batches in
flight, so memory is bounded whatever the input size) -> results come back in input order ->
either written straight away (one document per record, EOD appended) or, with ``group_key``,
spilled to a temporary token file and afterwards concatenated per group (groups in order of first
appearance, records in input order or sorted by ``group_sort_key``) -> length filter -> atomic
rename of .bin/.idx (+ stats JSON), then the completion marker (see shards.py, which also
defines what a shard of a sharded run owns).

Imports stay light (numpy, no torch or megatron-core): start-up is a fraction of a second.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ..atomic_file import write_text_atomically
from ..file_lock import OwnerLock
from . import shards
from .chat import ChatFormatError, render_chat
from .indexed import IndexedWriter, close_discarding
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
    shard: Optional[str] = None  # "I/N": write shard I of N to <output_prefix>.shard-I-of-N
    input_list: Optional[str] = None  # a text file naming more inputs, one per line
    force: bool = False  # redo even when a complete output with the same fingerprint exists

    def output_options(self) -> dict:
        """Everything that changes the bytes written (not workers, batch size, progress)."""
        skip = {"inputs", "output_prefix", "workers", "batch_size", "progress", "stats_path",
                "input_list", "force"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def shard_spec(self) -> Optional[shards.ShardSpec]:
        return shards.ShardSpec.parse(self.shard) if self.shard else None


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
OTHER_SHARD = "other_shard"  # a record another shard of a grouped run owns: not counted here


def _init_worker(cfg: PreprocessConfig, tok: Optional[Tokenizer] = None) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["tok"] = tok or build_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_path)
    _WORKER["shard"] = cfg.shard_spec()


def _process_one(cfg: PreprocessConfig, tok: Tokenizer, shard: Optional[shards.ShardSpec],
                 src: str, line: int, payload) -> tuple:
    """-> (tokens or None, mask or None, group key, sort key, drop reason or error text)."""
    try:
        rec = parse_record(src, line, payload)
        gkey = (str(get_field(rec, cfg.group_key, src, line, "--group-key"))
                if cfg.group_key else None)
        if gkey is not None and shard is not None and \
                shards.group_shard(gkey, shard.count) != shard.index:
            return None, None, None, None, OTHER_SHARD
        skey = (get_field(rec, cfg.group_sort_key, src, line, "--group-sort-key")
                if cfg.group_sort_key else None)
        if cfg.sft:
            try:
                messages = get_field(rec, cfg.messages_key, src, line, "--messages-key")
                ids, mask = render_chat(tok, messages)
            except ChatFormatError as e:
                raise BadRecordError(f"{src}:{line}: {e}") from None
        else:
            text = get_field(rec, cfg.text_key, src, line, "--text-key")
            if not isinstance(text, str):
                raise BadRecordError(f"{src}:{line}: field {cfg.text_key!r} is "
                                     f"{type(text).__name__}, expected a string")
            if not text.strip():
                return None, None, gkey, skey, "empty"
            ids, mask = tok.encode_np(text), None
        return ids, mask, gkey, skey, None
    except BadRecordError as e:
        if cfg.group_key and shard is not None and shard.index != 0:
            return None, None, None, None, OTHER_SHARD  # no group: shard 0 reports it
        return None, None, None, None, "bad_record:" + str(e)


def _process_batch(batch: list) -> list:
    cfg, tok, shard = _WORKER["cfg"], _WORKER["tok"], _WORKER["shard"]
    return [_process_one(cfg, tok, shard, *item) for item in batch]


def _batched(it: Iterator, n: int, max_chars: int = 1 << 20) -> Iterator[list]:
    """Batches of at most n records or ~max_chars characters (long documents: small batches,
    so the work spreads over the workers and memory in flight stays bounded)."""
    batch, chars = [], 0
    for x in it:
        batch.append(x)
        chars += len(x[2]) if isinstance(x[2], (str, bytes)) else 0
        if len(batch) == n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_results(cfg: PreprocessConfig, tok: Tokenizer, batches: Iterator[list]
                     ) -> Iterator[list]:
    """Worker results in input order, never more than 2*workers batches in flight."""
    if cfg.workers <= 1:  # in-process: reuse the already loaded tokenizer
        _init_worker(cfg, tok)
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
        self.open_line = False  # a \r-line is on screen without its newline

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
        self.open_line = not final

    def end_line(self) -> None:
        """Before an error message: finish the progress line so the message starts a line."""
        if self.open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open_line = False


def sort_key_order(value: Any) -> tuple:
    """Order of --group-sort-key values: numbers numerically (chunk 2 before chunk 10), then
    strings by code point, then anything else by its JSON text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, json.dumps(value, sort_keys=True))


class _GroupSpill:
    """Tokens of grouped records on disk; in memory a fixed 8-16 bytes per record while reading
    (group id, length, sort-key offset: no strings; 24-32 while emitting) plus one dict entry
    per group. Sort keys are spilled too and read back one group at a time."""

    def __init__(self, path: str, with_sort_keys: bool) -> None:
        self.path, self.keys_path = path, path + ".keys"
        self.f = open(path, "wb", buffering=1 << 20)
        self.kf = open(self.keys_path, "wb", buffering=1 << 20) if with_sort_keys else None
        self.key_ids: dict[str, int] = {}
        self.first_seen = array("q")  # per group: input position of its first record
        self.rec_group = array("i")
        self.rec_len = array("i")
        self.key_end = array("q")  # per record: end offset of its sort key in keys_path

    def add(self, ids: np.ndarray, gkey: str, skey: Any, position: int) -> None:
        self.f.write(np.asarray(ids, dtype=np.int32).tobytes())
        gid = self.key_ids.setdefault(gkey, len(self.key_ids))
        if gid == len(self.first_seen):
            self.first_seen.append(position)
        self.rec_group.append(gid)
        self.rec_len.append(len(ids))
        if self.kf is not None:
            self.kf.write(json.dumps(skey).encode())
            self.key_end.append(self.kf.tell())

    def groups(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(first input position, member token arrays in order) per group, groups in order of
        first appearance."""
        self.close()
        if not self.rec_len:
            return
        data = np.memmap(self.path, dtype=np.int32, mode="r")
        starts = np.zeros(len(self.rec_len) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.rec_len, dtype=np.int32), out=starts[1:])
        groups = np.frombuffer(self.rec_group, dtype=np.int32)
        order = np.argsort(groups, kind="stable")  # by group id, input order inside a group
        bounds = np.flatnonzero(np.diff(groups[order])) + 1
        keys = None
        if self.kf is not None and os.path.getsize(self.keys_path):
            kfile = open(self.keys_path, "rb")
            keys = mmap.mmap(kfile.fileno(), 0, access=mmap.ACCESS_READ)
            kfile.close()
            key_end = np.frombuffer(self.key_end, dtype=np.int64)
        for members in np.split(order, bounds):
            members = members.tolist()
            if keys is not None:
                def key(r: int) -> tuple:
                    lo = int(key_end[r - 1]) if r else 0
                    return sort_key_order(json.loads(keys[lo:int(key_end[r])]))
                members.sort(key=key)  # stable: ties keep input order
            yield (self.first_seen[int(groups[members[0]])],
                   [data[starts[r]:starts[r + 1]] for r in members])
        if keys is not None:
            keys.close()
        del data

    def close(self) -> None:
        for f in (self.f, self.kf):
            if f is not None and not f.closed:
                f.close()

    def remove(self) -> None:
        for f in (self.f, self.kf):
            if f is not None:
                close_discarding(f)  # a full disk must not keep the files
        for p in (self.path, self.keys_path):
            if os.path.exists(p):
                os.remove(p)


def _input_files(cfg: PreprocessConfig) -> list[str]:
    patterns = list(cfg.inputs)
    if cfg.input_list:
        with open(cfg.input_list) as f:
            patterns += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    if not patterns:
        raise ValueError("no inputs: give --input and/or --input-list")
    return expand_inputs(patterns)


def _fingerprint(cfg: PreprocessConfig, files: list[str], with_shard_index: bool) -> str:
    options = cfg.output_options()
    if not with_shard_index and cfg.shard:
        options["shard"] = "*/" + cfg.shard.split("/")[1].strip()
    identity = files + ([cfg.tokenizer_path] if cfg.tokenizer_path and
                        os.path.isfile(cfg.tokenizer_path) else [])
    return shards.fingerprint(options, identity)


class OutputBusy(ValueError):
    """Another live process writes the same output prefix."""


class _PrefixLock(OwnerLock):
    """One writer per output prefix: ``PREFIX.lock`` (kept, like run_dir/run.lock)."""

    guards = "this output prefix"

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix + ".lock")
        self.prefix = prefix

    def busy(self, holder: str) -> Exception:
        return OutputBusy(f"{self.prefix}: another preprocessing run writes this output prefix "
                          f"({holder}); wait for it to end or stop it, or choose another "
                          "--output-prefix")


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole conversion (or this shard of it); returns the stats dict (also written as
    JSON). A complete output made from the same inputs and options is kept, not redone; a
    previous complete output is replaced only once the new one is complete."""
    if cfg.sft and cfg.group_key:
        raise ValueError("--group-key cannot be combined with --sft (conversations stay apart)")
    spec = cfg.shard_spec()
    if spec is not None and cfg.stats_path:
        raise ValueError("--stats cannot be combined with --shard: each shard writes "
                         "PREFIX.shard-I-of-N.stats.json and the merge joins them")
    prefix = (shards.shard_prefix(cfg.output_prefix, spec.index, spec.count) if spec
              else cfg.output_prefix)
    # Before anything under the prefix is read or removed (a second run would delete the
    # first one's temporaries); released when this function returns or the process dies.
    with _PrefixLock(prefix):
        try:
            return _preprocess_locked(cfg, spec, prefix)
        except BaseException:
            # Whatever failed (a full disk included), none of this run's temporaries stay.
            shards.remove_temporaries(prefix, pid=os.getpid())
            raise


def _preprocess_locked(cfg: PreprocessConfig, spec: Optional[shards.ShardSpec],
                       prefix: str) -> dict:
    all_files = _input_files(cfg)
    stats_path = cfg.stats_path or prefix + ".stats.json"
    job = _fingerprint(cfg, all_files, with_shard_index=False)
    done = _fingerprint(cfg, all_files, with_shard_index=True)
    if not cfg.force and shards.is_complete(prefix, done) and os.path.exists(stats_path):
        with open(stats_path) as f:
            out = json.load(f)
        out["skipped"] = True
        return out
    shards.remove_temporaries(prefix)  # of a killed run; its complete output (if any) stays
    # grouped shards read every input (a group may span files); others a range of files
    files = (shards.files_for_shard(all_files, spec) if spec and not cfg.group_key
             else all_files)
    tok = build_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_path)
    stats, progress, t0 = Stats(files=len(all_files)), _Progress(cfg.progress), time.time()
    eod = np.asarray([tok.eos_id] if cfg.append_eod else [], dtype=np.int32)
    bos = np.asarray([tok.bos_id] if cfg.prepend_bos else [], dtype=np.int32)
    spill = (_GroupSpill(prefix + f".tmp-{os.getpid()}.groups", cfg.group_sort_key is not None)
             if cfg.group_key else None)
    # grouped shard: first input position of each kept document (the merge interleaves by it)
    order = array("q") if spec is not None and cfg.group_key else None

    def emit(writer: IndexedWriter, ids: np.ndarray, mask: Optional[np.ndarray],
             position: int = 0) -> None:
        if len(ids) < cfg.min_doc_length:
            stats.dropped["too_short"] += 1
            return
        writer.add(ids, mask)
        stats.keep(len(ids))
        if order is not None:
            order.append(position)

    try:
        with IndexedWriter(prefix, tok.vocab_size, with_mask=cfg.sft) as writer:
            batches = _batched(iter_records(files), cfg.batch_size)
            position = -1
            for results in _ordered_results(cfg, tok, batches):
                for ids, mask, gkey, skey, reason in results:
                    position += 1  # index of the record among all records of all inputs
                    if reason == OTHER_SHARD:
                        continue
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
                        spill.add(ids, gkey, skey, position)
                    else:
                        # SFT: the conversation ends with <|eot_id|>, as in the chat template.
                        emit(writer, ids if cfg.sft else np.concatenate([bos, ids, eod]), mask)
                progress.update(stats)
            if spill is not None:
                sep = tok.encode_np(cfg.group_separator) if cfg.group_separator else None
                for first, members in spill.groups():
                    stats.groups += 1
                    parts = []
                    for i, m in enumerate(members):
                        if i and sep is not None and len(sep):
                            parts.append(sep)
                        parts.append(m)
                    emit(writer, np.concatenate([bos] + parts + [eod]), None, first)
            if stats.docs_kept == 0 and spec is None:
                raise ValueError(f"no document kept from {files} (dropped: "
                                 f"{dict(stats.dropped)}); check --text-key and "
                                 "--min-doc-length")
            replaced = [prefix + s for s in (".bin", ".idx", ".stats.json")]
            if cfg.sft:
                replaced += [prefix + s for s in (".lossmask.bin", ".lossmask.idx")]
            if order is not None:
                replaced.append(prefix + shards.ORDER_SUFFIX)
            writer.close(before_publish=lambda: shards.retire(prefix, replaced))
        if order is not None:
            tmp = prefix + f".tmp-{os.getpid()}{shards.ORDER_SUFFIX}"
            np.save(tmp, np.asarray(order, dtype=np.int64))
            os.replace(tmp, prefix + shards.ORDER_SUFFIX)
    except BaseException:
        progress.end_line()
        raise
    finally:
        if spill is not None:
            spill.remove()
    stats.elapsed_s = time.time() - t0
    progress.update(stats, final=True)
    out = stats.to_dict()
    out["tokenizer"] = tok.describe()
    out["output_prefix"] = prefix
    if spec is not None:
        out["shard"] = {"index": spec.index, "count": spec.count, "files_read": len(files),
                        "assignment": "group-hash" if cfg.group_key else "file-range"}
    write_text_atomically(stats_path, json.dumps(out, indent=2),
                          tmp=prefix + f".tmp-{os.getpid()}.stats.json" if cfg.stats_path is None
                          else None)
    shards.write_marker(prefix, done, {"job": job, "stats": os.path.abspath(stats_path)})
    return out

