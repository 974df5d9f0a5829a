"""Held-out documents: a deterministic share of each domain that training never sees.

`HeldOutSpec` says how many documents each domain gives up: at least `docs`, or `fraction` of the
documents its stream would keep, whichever is more, always leaving one for training. Which ones is
a pure function of (seed, domain name, document lengths): a generator seeded by
(seed, crc32(name)) draws them among the documents long enough for the domain's packing mode
(a long-mode domain only gives up documents it would train on). The training stream then reads
the domain through a `PoolView` of the kept documents (data/mixture.py), validation through a
view of the held-out ones (`validation_samples`), so no held-out token ever reaches a batch.

Changing the spec changes which documents train; keep it fixed for the life of a run.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import DomainConfig, effective_min_doc_length
from .indexed import DocumentPool
from .packing import PackedSample
from .streams import DomainStream


@dataclass(frozen=True)
class HeldOutSpec:
    docs: int = 0  # at least this many documents per domain
    fraction: float = 0.0  # ... or this fraction of the domain's eligible documents
    seed: int = 4321

    @property
    def active(self) -> bool:
        return self.docs > 0 or self.fraction > 0


def heldout_documents(lengths: np.ndarray, name: str, min_length: int,
                      spec: HeldOutSpec) -> np.ndarray:
    """Sorted ids of the documents domain `name` holds out (empty when the spec is inactive)."""
    eligible = np.nonzero(np.asarray(lengths) >= max(1, min_length))[0]
    want = max(spec.docs, math.ceil(spec.fraction * len(eligible)))
    k = min(want, len(eligible) - 1)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(eligible, k, replace=False)).astype(np.int64)


class PoolView:
    """A DocumentPool restricted to some of its documents (renumbered 0..n-1)."""

    def __init__(self, pool, doc_ids: np.ndarray) -> None:
        self.pool = pool
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.lengths = pool.lengths[self.doc_ids]
        self.has_mask = pool.has_mask

    def __len__(self) -> int:
        return len(self.doc_ids)

    def tokens(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        return self.pool.tokens(int(self.doc_ids[doc]), offset, length)

    def mask(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        return self.pool.mask(int(self.doc_ids[doc]), offset, length)


def split_pool(pool, name: str, mode: str, min_doc_length: Optional[int], seq_length: int,
               spec: HeldOutSpec) -> tuple[PoolView, PoolView]:
    """(training view, held-out view) of one domain's documents."""
    held = heldout_documents(pool.lengths, name,
                             effective_min_doc_length(mode, min_doc_length, seq_length), spec)
    kept = np.setdiff1d(np.arange(len(pool), dtype=np.int64), held, assume_unique=True)
    return PoolView(pool, kept), PoolView(pool, held)


def validation_samples(domains: list[DomainConfig], seq_length: int, rows: int,
                       spec: Optional[HeldOutSpec], pad_id: int, default_mode: str = "short",
                       sft_overflow: str = "truncate", vocab_size: Optional[int] = None
                       ) -> list[PackedSample]:
    """Up to `rows` packed rows per domain, packed as the domain trains (mode, minimum length),
    from its held-out documents (spec given) or from the whole datasets (separate validation
    data, spec None). The same rows every call. Domains with nothing held out give none."""
    out: list[PackedSample] = []
    for dom in domains:
        mode = dom.mode or default_mode
        pool = DocumentPool(dom.paths, vocab_size)
        if spec is not None:
            pool = split_pool(pool, dom.name, mode, dom.min_doc_length, seq_length, spec)[1]
        if len(pool) == 0:
            continue
        seed = spec.seed if spec is not None else 0
        stream = DomainStream(dom.name, pool, seq_length, mode, dom.min_doc_length, seed,
                              pad_id, sft_overflow)
        distinct = max(1, stream.tokens_per_epoch // seq_length)  # rows before repeating
        out += [stream.sample(k) for k in range(min(rows, distinct))]
    return out
