"""One domain's documents turned into an indexable sequence of packed samples.

Every epoch is a fresh permutation of the domain's kept documents, seeded by (seed, domain name,
epoch), so sample k of a domain is a pure function of (seed, k): random access, no state, exact
resume. Packing rules per mode:

* long  : documents shorter than ``min_doc_length`` (default: seq_length) are dropped. The kept
          documents are laid end to end and cut every seq_length tokens, so a document longer than
          the sequence becomes seq_length pieces and its tail continues in the next sample.
* short : the same stream packing over all documents (min_doc_length default 1): random
          documents concatenated, the cut-off tail carries over to the next sample.
* sft   : no carry-over. Conversations are added in permuted order until the next one does not
          fit. ``sft_overflow='truncate'`` (ProLong): that conversation is cut at the sequence end
          and its tail dropped, so every sample is full. ``'drop'``: it starts the next sample
          instead and the current one is padded; conversations longer than seq_length are dropped.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .config import effective_min_doc_length
from .indexed import DocumentPool
from .packing import PackedSample, build_sample


@dataclass(frozen=True)
class Piece:
    doc: int      # document id in the pool
    offset: int   # first token taken from it
    length: int   # number of tokens taken


class DomainStream:
    _CACHE_EPOCHS = 3

    def __init__(self, name: str, pool: DocumentPool, seq_length: int, mode: str,
                 min_doc_length: int | None, seed: int, pad_id: int,
                 sft_overflow: str = "truncate") -> None:
        self.name, self.pool, self.seq_length, self.mode = name, pool, seq_length, mode
        self.seed, self.pad_id, self.sft_overflow = seed, pad_id, sft_overflow
        min_doc_length = effective_min_doc_length(mode, min_doc_length, seq_length)
        self.min_doc_length = min_doc_length
        keep = pool.lengths >= max(1, min_doc_length)
        if mode == "sft":
            if not pool.has_mask:
                raise ValueError(f"domain {name!r}: mode 'sft' needs datasets with a loss mask "
                                 "(preprocess with --sft, or import MDS data that has 'mask')")
            if sft_overflow == "drop":
                keep &= pool.lengths <= seq_length
        self.docs = np.nonzero(keep)[0].astype(np.int64)
        if len(self.docs) == 0:
            raise ValueError(f"domain {name!r}: no document of {len(pool)} passes the filter "
                             f"(min_doc_length={min_doc_length}, mode={mode}, longest="
                             f"{int(pool.lengths.max()) if len(pool) else 0}); lower "
                             "min_doc_length or use a different dataset")
        self.tokens_per_epoch = int(pool.lengths[self.docs].sum())
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._sft_epoch_starts = [0]  # global sample index where each SFT epoch begins
        self._name_key = zlib.crc32(name.encode())

    # ---- epochs -------------------------------------------------------------------------
    def _epoch(self, e: int) -> tuple:
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        rng = np.random.default_rng([self.seed, self._name_key, e])
        perm = self.docs[rng.permutation(len(self.docs))]
        cum = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(self.pool.lengths[perm], out=cum[1:])
        entry = (perm, cum, self._sft_bounds(perm) if self.mode == "sft" else None)
        self._cache[e] = entry
        if len(self._cache) > self._CACHE_EPOCHS:
            self._cache.popitem(last=False)
        return entry

    def _sft_bounds(self, perm: np.ndarray) -> np.ndarray:
        """Start positions (into perm) of each SFT sample of an epoch, plus the end."""
        L, truncate = self.seq_length, self.sft_overflow == "truncate"
        starts, fill = [0], 0
        for i, n in enumerate(self.pool.lengths[perm].tolist()):
            if truncate:
                fill += n
                if fill >= L:
                    starts.append(i + 1)
                    fill = 0
            elif fill + n > L:
                starts.append(i)
                fill = n
            else:
                fill += n
        if starts[-1] != len(perm):
            starts.append(len(perm))
        return np.asarray(starts, dtype=np.int64)

    # ---- samples ------------------------------------------------------------------------
    def pieces(self, k: int) -> list[Piece]:
        """The document pieces that make up sample k of this domain (no token reads)."""
        return self._sft_pieces(k) if self.mode == "sft" else self._stream_pieces(k)

    def _stream_pieces(self, k: int) -> list[Piece]:
        T, out = self.tokens_per_epoch, []
        pos, remaining = k * self.seq_length, self.seq_length
        while remaining:
            e, off = divmod(pos, T)
            perm, cum, _ = self._epoch(e)
            j = int(np.searchsorted(cum, off, side="right")) - 1
            doc_off = off - int(cum[j])
            take = min(int(cum[j + 1]) - off, remaining)
            out.append(Piece(int(perm[j]), doc_off, take))
            pos += take
            remaining -= take
        return out

    def _sft_pieces(self, k: int) -> list[Piece]:
        starts = self._sft_epoch_starts
        while starts[-1] <= k:  # extend the epoch table until it covers k
            e = len(starts) - 1
            starts.append(starts[-1] + len(self._epoch(e)[2]) - 1)
        e = int(np.searchsorted(starts, k, side="right")) - 1
        perm, _, bounds = self._epoch(e)
        s = k - starts[e]
        out, room = [], self.seq_length
        for j in range(int(bounds[s]), int(bounds[s + 1])):
            doc = int(perm[j])
            take = min(int(self.pool.lengths[doc]), room)
            out.append(Piece(doc, 0, take))
            room -= take
        return out

    def segment_lengths(self, k: int) -> np.ndarray:
        """Segment lengths of sample k (padding included) without reading tokens."""
        lens = [p.length for p in self.pieces(k)]
        if sum(lens) < self.seq_length:
            lens.append(self.seq_length - sum(lens))
        return np.asarray(lens, dtype=np.int64)

    def sample(self, k: int) -> PackedSample:
        pieces = self.pieces(k)
        segs = [self.pool.tokens(p.doc, p.offset, p.length) for p in pieces]
        masks = ([self.pool.mask(p.doc, p.offset, p.length) for p in pieces]
                 if self.mode == "sft" else None)
        return build_sample(segs, self.seq_length, self.name, self.pad_id, masks)
