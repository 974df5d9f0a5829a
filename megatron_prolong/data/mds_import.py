"""The released ProLong data (MDS) -> one indexed dataset per domain directory
(tools/import_prolong_mds.py).

Streams: every directory under --input that holds an index.json (see mds.find_streams; the
release's per-domain merged index, or --input itself for prolong-ultrachat-64K). Each stream
becomes ``OUTPUT/<its path under --input>`` (.bin/.idx, + .lossmask for SFT data), the name the
mixtures in examples/mixtures/ use; the samples' ``domain`` column is not a name (in the release it
is "." in places) and is only reported.

Each MDS sample (input_ids, indices = [n, 2] spans of the original documents, optionally length
and the SFT mask) becomes one megatron document whose sequences are its spans, so every original
document stays a separate sequence (the boundaries the packer uses). Tokens are kept verbatim
(ProLong's Llama-3 ids), or re-tokenized for another model (retokenize.py). A stream is written
under temporary names and renamed when complete; a format error stops the import with one line
naming the shard (and sample) and leaves no part of that stream behind; mixture.yaml and
import_stats.json are written only when every stream is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import yaml

from ..atomic_file import write_text_atomically
from .config import effective_min_doc_length, load_mixture
from .indexed import IndexedWriter
from .mds import MDSFormatError, Shard, find_streams, iter_shard, read_index

MAX_REPORTED_DOMAIN_VALUES = 8


@dataclass
class Columns:
    ids: str = "input_ids"
    indices: str = "indices"
    mask: str = "mask"
    length: str = "length"
    domain: str = "domain"


@dataclass
class Document:
    """One imported MDS sample: its tokens, loss mask (SFT) and the lengths of its sequences
    (and of the source spans they came from)."""
    tokens: np.ndarray
    mask: Optional[np.ndarray]
    lengths: list[int]
    source_lengths: Optional[list[int]] = None


@dataclass
class Sample:
    """One MDS sample, checked: ids, its document spans, mask or None."""
    ids: np.ndarray
    spans: np.ndarray
    mask: Optional[np.ndarray]
    where: str


@dataclass
class ShardResult:
    documents: list[Document]
    stats: dict = field(default_factory=dict)
    domain_values: set = field(default_factory=set)


def _spans(raw, n: int, where: str, key: str) -> np.ndarray:
    if raw is None:
        return np.array([[0, n]], dtype=np.int64)
    spans = np.asarray(raw, dtype=np.int64)
    if spans.size == 0 or spans.size % 2:
        raise MDSFormatError(f"{where}: column {key!r} has shape {list(np.shape(raw))}; expected "
                             "[n, 2] document spans")
    spans = spans.reshape(-1, 2)
    if (spans[:, 0] < 0).any() or (spans[:, 1] > n).any() or (spans[:, 1] <= spans[:, 0]).any() \
            or (spans[1:, 0] < spans[:-1, 1]).any():
        raise MDSFormatError(f"{where}: column {key!r}: invalid spans {spans.tolist()[:4]}... for "
                             f"{n} tokens (need sorted, non-empty, inside the sample)")
    return spans


def check_sample(raw: dict, where: str, cols: Columns, vocab_size: int) -> Sample:
    ids = np.asarray(raw[cols.ids]).reshape(-1)
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise MDSFormatError(f"{where}: token id {int(ids.max())} outside the vocabulary of "
                             f"{vocab_size}; wrong --vocab-size?")
    length = raw.get(cols.length)
    if length is not None and int(length) != ids.size:
        raise MDSFormatError(f"{where}: column {cols.length!r} says {length} tokens, "
                             f"{cols.ids!r} holds {ids.size}")
    mask = raw.get(cols.mask)
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if mask.size != ids.size:
            raise MDSFormatError(f"{where}: column {cols.mask!r} has {mask.size} entries for "
                                 f"{ids.size} tokens")
    return Sample(ids.astype(np.int64), _spans(raw.get(cols.indices), ids.size, where,
                                               cols.indices), mask, where)


class Verbatim:
    """The sample's spans as they are (ProLong's Llama-3 ids), optionally each followed by an
    EOD id."""

    def __init__(self, append_eod: Optional[int] = None):
        self.append_eod = append_eod

    def __call__(self, sample: Sample) -> tuple[Document, dict]:
        eod = self.append_eod
        pieces, mpieces, lengths = [], [], []
        for a, b in sample.spans.tolist():
            pieces.append(sample.ids[a:b])
            if sample.mask is not None:
                mpieces.append(sample.mask[a:b].astype(np.uint8))
            if eod is not None:
                pieces.append(np.array([eod], np.int64))
                if sample.mask is not None:
                    mpieces.append(np.zeros(1, np.uint8))
            lengths.append(b - a + (eod is not None))
        tokens = np.concatenate(pieces)
        return Document(tokens, np.concatenate(mpieces) if mpieces else None, lengths,
                        (sample.spans[:, 1] - sample.spans[:, 0]).tolist()), {}


Convert = Callable[[Sample], tuple[Document, dict]]


def import_shard(shard: Shard, cols: Columns, vocab_size: int, convert: Convert,
                 allow_pickle: bool = False) -> ShardResult:
    """Read, check and convert every sample of one shard (runs in a worker process when
    --workers > 1)."""
    result = ShardResult([])
    stats = result.stats
    for k, raw in iter_shard(shard, allow_pickle):
        sample = check_sample(raw, f"{shard.where} sample {k}", cols, vocab_size)
        doc, extra = convert(sample)
        result.documents.append(doc)
        dom = raw.get(cols.domain)
        if dom is not None and len(result.domain_values) < MAX_REPORTED_DOMAIN_VALUES:
            result.domain_values.add(str(dom))
        covered = int((sample.spans[:, 1] - sample.spans[:, 0]).sum())
        for key, value in (("samples", 1), ("source_tokens", sample.ids.size),
                           ("dropped_gap_tokens", sample.ids.size - covered), *extra.items()):
            stats[key] = stats.get(key, 0) + value
    return result


def _check_columns(name: str, shards: list[Shard], cols: Columns) -> bool:
    """The stream's shards all hold the ids column and agree on a mask; returns whether SFT."""
    has_mask = None
    for shard in shards:
        names = [c for c, _, _ in shard.columns]
        if cols.ids not in names:
            raise MDSFormatError(f"{shard.where}: no column {cols.ids!r} (has {names}); pass "
                                 "--ids-key")
        if has_mask is not None and has_mask != (cols.mask in names):
            raise MDSFormatError(f"{shard.where}: column {cols.mask!r} is "
                                 f"{'missing' if has_mask else 'present'} here but not in the "
                                 f"stream's other shards ({name})")
        has_mask = cols.mask in names
    return bool(has_mask)


def stream_names(input_dir: str, name: Optional[str]) -> list[tuple[str, str]]:
    """(output name, stream directory): the stream's path under --input; --input itself (a
    single-stream dataset such as prolong-ultrachat-64K) is named `name` or its basename."""
    out = []
    for stream in find_streams(input_dir):
        rel = os.path.relpath(stream, input_dir)
        if rel == ".":
            rel = name or os.path.basename(os.path.abspath(input_dir))
        elif name:
            raise MDSFormatError(f"--name applies when --input is itself one stream (holds "
                                 f"index.json); {input_dir} holds several (e.g. {rel})")
        out.append((rel.replace(os.sep, "/"), stream))
    return out


@contextlib.contextmanager
def _shard_mapper(workers: int):
    """map(fn, shards) in order: in this process, or over one pool of spawned workers for the
    whole import (workers import this module, mds.py and the numpy writer, not megatron-core)."""
    if workers <= 1:
        yield map
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # terminated on exit
        yield pool.imap


class _ShardJob:
    """Picklable per-shard work for a process pool."""

    def __init__(self, cols, vocab_size, convert, allow_pickle):
        self.args = (cols, vocab_size, convert, allow_pickle)

    def __call__(self, shard: Shard) -> ShardResult:
        cols, vocab_size, convert, allow_pickle = self.args
        return import_shard(shard, cols, vocab_size, convert, allow_pickle)


def import_mds(input_dir: str, output_dir: str, *, name: Optional[str] = None,
               vocab_size: int = 128256, out_vocab_size: Optional[int] = None,
               cols: Optional[Columns] = None, convert: Optional[Convert] = None,
               append_eod: Optional[int] = None, min_lengths: Optional[dict] = None,
               allow_pickle: bool = False, workers: int = 1,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Import every stream under input_dir; returns the stats per output name. `convert`
    (default: verbatim) turns a checked sample into the document written; `min_lengths`
    {output name: minimum document length} counts the documents a `long` domain would drop."""
    cols = cols or Columns()
    job = _ShardJob(cols, vocab_size, convert or Verbatim(append_eod), allow_pickle)
    streams = stream_names(input_dir, name)
    indexes = {out: read_index(stream) for out, stream in streams}  # every index before any data
    sft = {out: _check_columns(out, shards, cols) for out, shards in indexes.items()}
    all_stats: dict = {}
    with _shard_mapper(workers) as mapper:
        for out, stream in streams:
            shards = indexes[out]
            min_len = (min_lengths or {}).get(out.split("/")[-1])
            st = {"stream": stream, "shards": len(shards), "samples": 0, "documents": 0,
                  "tokens": 0, "source_tokens": 0, "dropped_gap_tokens": 0}
            if min_len:
                st.update(min_doc_length=min_len, documents_below_min_length=0,
                          source_documents_below_min_length=0)
            domain_values: set = set()
            with IndexedWriter(os.path.join(output_dir, out), out_vocab_size or vocab_size,
                               with_mask=sft[out]) as writer:
                for result in mapper(job, shards):
                    for doc in result.documents:
                        if doc.lengths:  # a sample whose every span re-tokenized to nothing
                            writer.add(doc.tokens, doc.mask, doc.lengths)
                        st["documents"] += len(doc.lengths)
                        st["tokens"] += len(doc.tokens)
                        if min_len:
                            st["documents_below_min_length"] += sum(n < min_len for n in doc.lengths)
                            st["source_documents_below_min_length"] += sum(
                                n < min_len for n in doc.source_lengths or ())
                    for key, value in result.stats.items():
                        st[key] = st.get(key, 0) + value
                    domain_values |= result.domain_values
            st["domain_column"] = sorted(domain_values)
            all_stats[out] = st
            log(summary_line(out, st))
    _write_mixture(output_dir, all_stats)
    return all_stats


def mixture_min_lengths(path: str) -> dict:
    """{dataset name: minimum document length} for the `long` domains of a mixture YAML, the
    dataset name being the last component of each of the domain's paths (the importer's output
    names); the minimum is the domain's min_doc_length, else the mixture's seq_length (the
    packer's rule, config.effective_min_doc_length)."""
    with open(path) as f:
        seq_length = (yaml.safe_load(f) or {}).get("seq_length")
    out = {}
    for d in (d for d in load_mixture(path) if d.mode == "long"):
        minimum = effective_min_doc_length(d.mode, d.min_doc_length, seq_length)
        if minimum:
            out.update({p.rstrip("/").split("/")[-1]: int(minimum) for p in d.paths})
    return out


def summary_line(out: str, st: dict) -> str:
    line = (f"{out}: {st['samples']:,} samples, {st['documents']:,} documents, "
            f"{st['tokens']:,} tokens")
    if st["tokens"] != st["source_tokens"]:
        line += f" (from {st['source_tokens']:,})"
    if "documents_below_min_length" in st:
        line += (f"; {st['documents_below_min_length']:,} documents below the domain's minimum "
                 f"length {st['min_doc_length']:,}")
        if st["tokens"] != st["source_tokens"]:
            line += f" ({st['source_documents_below_min_length']:,} before re-tokenization)"
    return line


def _write_mixture(output_dir: str, stats: dict) -> None:
    total = sum(v["tokens"] for v in stats.values()) or 1
    mixture = {"domains": [{"name": out, "paths": [os.path.join(output_dir, out)],
                            "proportion": round(v["tokens"] / total, 6)}
                           for out, v in sorted(stats.items())]}
    texts = {"mixture.yaml": "# Realised token shares of the imported data; edit proportions as "
                             "needed.\n" + yaml.safe_dump(mixture, sort_keys=False),
             "import_stats.json": json.dumps(stats, indent=2)}
    for fname, text in texts.items():
        write_text_atomically(os.path.join(output_dir, fname), text)
