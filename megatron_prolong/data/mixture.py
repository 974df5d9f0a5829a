"""Domain mixtures: global sample index -> (domain, domain-local sample) -> PackedSample.

Domain assignment is megatron's deterministic "largest deficit" rule: sample i goes to the
domain whose realised count lags its target share most (weights * max(i, 1) - count). Since every
sample has exactly seq_length tokens, every prefix of the sequence of samples has each domain's
token share within one sample of its target (1,000 samples: within 0.1 percentage point).
Everything is a pure function of (config, seed, index): resuming at consumed-sample count N
yields exactly what an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .config import DataConfig, DomainConfig
from .heldout import split_pool
from .indexed import DocumentPool
from .max_token_id import check_token_ids
from .packing import PackedSample
from .streams import DomainStream
from .tokenizer import Tokenizer, build_tokenizer


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(domain index, domain-local sample index) for global samples 0..size-1."""
    weights = np.asarray(weights, dtype=np.float64)
    domain = np.zeros(size, dtype=np.int16)
    local = np.zeros(size, dtype=np.int64)
    try:
        from megatron.core.datasets import helpers_cpp  # compiled, ships with the wheel

        helpers_cpp.build_blending_indices(domain, local, weights, len(weights), size, False)
    except ImportError:  # same rule in Python (slower, identical output)
        counts = np.zeros(len(weights), dtype=np.int64)
        for i in range(size):
            d = int(np.argmax(weights * max(i, 1.0) - counts))
            domain[i], local[i] = d, counts[d]
            counts[d] += 1
    return domain, local


class MixtureDataset:
    """Indexable packed samples from a weighted set of domains.

    ``dataset[i]`` -> PackedSample (deterministic). ``segment_lengths(i)`` gives the document
    lengths of sample i cheaply (for smart batching). ``len()`` is ``num_samples`` when given,
    otherwise effectively unbounded (domains cycle through new epochs).
    """

    def __init__(self, streams: list[DomainStream], weights: list[float], seq_length: int,
                 num_samples: Optional[int] = None) -> None:
        if len(streams) != len(weights) or not streams:
            raise ValueError("need one weight per domain stream")
        self.streams, self.seq_length = streams, seq_length
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.num_samples = num_samples
        self._domain = np.zeros(0, dtype=np.int16)
        self._local = np.zeros(0, dtype=np.int64)

    @property
    def domain_names(self) -> list[str]:
        return [s.name for s in self.streams]

    def __len__(self) -> int:
        return self.num_samples if self.num_samples is not None else 2**62

    def locate(self, i: int) -> tuple[int, int]:
        if i < 0 or (self.num_samples is not None and i >= self.num_samples):
            raise IndexError(f"sample index {i} out of range [0, {len(self)})")
        if i >= len(self._domain):  # the rule is prefix-stable, so growing the table is exact
            size = max(2 * len(self._domain), i + 1, 4096)
            self._domain, self._local = blending_indices(self.weights, size)
        return int(self._domain[i]), int(self._local[i])

    def __getitem__(self, i: int) -> PackedSample:
        d, k = self.locate(int(i))
        return self.streams[d].sample(k)

    def segment_lengths(self, i: int) -> np.ndarray:
        d, k = self.locate(int(i))
        return self.streams[d].segment_lengths(k)


def build_domain_stream(dom: DomainConfig, seq_length: int, seed: int, tokenizer: Tokenizer,
                        cfg: DataConfig, scan_token_ids: bool = True) -> DomainStream:
    """With cfg.check_token_ids every read is checked against the vocabulary, and (with
    `scan_token_ids`) each dataset's largest id once at open (cached per file), so that a bad
    id in a late document stops the run at start."""
    pool = DocumentPool(dom.paths, tokenizer.vocab_size if cfg.check_token_ids else None)
    if cfg.check_token_ids and scan_token_ids:
        for store in pool.stores:
            check_token_ids(store.prefix, tokenizer.vocab_size)
    if cfg.heldout is not None and cfg.heldout.active:  # validation documents stay out
        pool = split_pool(pool, dom.name, dom.mode or cfg.mode, dom.min_doc_length, seq_length,
                          cfg.heldout)[0]
    return DomainStream(dom.name, pool, seq_length, dom.mode or cfg.mode, dom.min_doc_length,
                        seed, tokenizer.pad_id, cfg.sft_overflow)


def rescaled_mixture_table(cfg: DataConfig) -> Optional[str]:
    """When the given proportions do not sum to 1 (they are relative weights, as in megatron's
    blends), the table of what each domain will get; None when they already sum to 1."""
    given = cfg.given_domains()
    total = sum(d.proportion for d in given)
    if abs(total - 1.0) <= 1e-6 or total <= 0:
        return None
    width = max(len(d.name) for d in given)
    rows = [f"  {d.name:<{width}}  {d.proportion:8.4g} -> {d.proportion / total:7.2%}"
            for d in given]
    return (f"data mixture: the proportions sum to {total:.6g}, not 1; rescaled to shares of "
            "the training tokens:\n" + "\n".join(rows))


def build_pretraining_dataset(cfg: DataConfig, seq_length: int, seed: Optional[int] = None,
                              mode: Optional[str] = None, num_samples: Optional[int] = None,
                              tokenizer: Optional[Tokenizer] = None,
                              scan_token_ids: bool = True) -> MixtureDataset:
    """The trainer's entry point. ``seed``/``mode`` override the config's when given (mode only
    for domains that do not set their own). Also used for SFT (mode 'sft'). The trainer scans
    token ids on one rank only (``scan_token_ids``)."""
    if mode is not None:
        cfg = DataConfig(**{**cfg.__dict__, "mode": mode})
    seed = cfg.seed if seed is None else seed
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_path)
    domains = [d for d in cfg.resolved_domains() if d.proportion > 0]
    streams = [build_domain_stream(d, seq_length, seed, tokenizer, cfg, scan_token_ids)
               for d in domains]
    return MixtureDataset(streams, [d.proportion for d in domains], seq_length, num_samples)
