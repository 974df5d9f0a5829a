"""Validation loss on held-out rows: per domain, and by position in the document.

Rows are packed exactly as training packs them (data/heldout.py builds them from each domain's
held-out documents). The loss is the per-token cross-entropy over the loss tokens, summed and
divided by their count (a token mean, as training's loss).

Position buckets: a token at position p of its document segment (p tokens of context before
it) falls into bucket [b_i, b_i+1) of the boundaries (default 1K, 4K, 16K, 64K, ... below the
sequence length). Only segments at least `long_document_tokens` long count (default: the largest
boundary, so each of them spans every bucket): the buckets then compare the same documents early
and late, the cheap signal that later tokens profit from the earlier ones. Bucket sums add up to
the long-document total; domain sums add up to the overall total.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_prolong.config import RunConfig
from megatron_prolong.data.packing import PackedSample, collate_packed
from megatron_prolong.evaluation.forward import forward_only, sum_over_replicas


def default_buckets(seq_length: int) -> list[int]:
    """1K, 4K, 16K, ... (x4) below seq_length."""
    out, b = [], 1024
    while b < seq_length:
        out.append(b)
        b *= 4
    return out


def _short(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_labels(boundaries: list[int], seq_length: int) -> list[str]:
    edges = [0, *boundaries, seq_length]
    return [f"{_short(a)}-{_short(b)}" for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class ValidationSettings:
    seq_length: int
    domains: list[str]
    boundaries: list[int] = field(default_factory=list)
    long_document_tokens: Optional[int] = None

    @property
    def long_min(self) -> int:
        if self.long_document_tokens:
            return self.long_document_tokens
        return self.boundaries[-1] if self.boundaries else 1

    @property
    def labels(self) -> list[str]:
        return bucket_labels(self.boundaries, self.seq_length)

    @property
    def columns(self) -> int:
        """Width of the loss sums: domains, position buckets, tokens outside every bucket."""
        return len(self.domains) + len(self.boundaries) + 2

    @classmethod
    def for_run(cls, cfg: RunConfig, samples: list[PackedSample]) -> "ValidationSettings":
        """The run's `evaluation` settings over the domains of its held-out rows."""
        e, seq = cfg.evaluation, cfg.training.seq_length
        return cls(seq, list(dict.fromkeys(s.domain for s in samples)),
                   e.position_buckets or default_buckets(seq), e.long_document_tokens)


def validation_batch(sample: PackedSample, settings: ValidationSettings) -> dict:
    """One packed row with per-token domain ids and position-bucket ids."""
    batch = collate_packed([sample])
    lens = np.diff(sample.cu_seqlens.astype(np.int64))
    starts = np.repeat(sample.cu_seqlens[:-1].astype(np.int64), lens)
    position = np.arange(sample.seq_length) - starts
    buckets = np.searchsorted(np.asarray(settings.boundaries, dtype=np.int64), position,
                              side="right")
    outside = len(settings.boundaries) + 1  # the column for tokens of short segments
    buckets[np.repeat(lens, lens) < settings.long_min] = outside
    domain = settings.domains.index(sample.domain)
    batch["eval_domain"] = torch.full((1, sample.seq_length), domain, dtype=torch.int64)
    batch["eval_bucket"] = torch.from_numpy(buckets.astype(np.int64))[None]
    batch["eval_sizes"] = (len(settings.domains), outside)
    return batch


@dataclass
class ValidationResult:
    loss: float
    tokens: int
    domain_loss: dict = field(default_factory=dict)  # name -> loss (domains with tokens)
    domain_tokens: dict = field(default_factory=dict)
    position_loss: dict = field(default_factory=dict)  # bucket label -> loss (non-empty ones)
    position_tokens: dict = field(default_factory=dict)
    long_loss: Optional[float] = None  # the tokens the buckets cover
    long_tokens: int = 0

    @classmethod
    def from_sums(cls, sums: torch.Tensor, settings: ValidationSettings) -> "ValidationResult":
        loss, count = sums[0].tolist(), sums[1].tolist()
        nd, labels = len(settings.domains), settings.labels

        def mean(s, n):
            return s / n if n else float("nan")

        total_s, total_n = sum(loss[:nd]), sum(count[:nd])
        long_s, long_n = sum(loss[nd:nd + len(labels)]), sum(count[nd:nd + len(labels)])
        out = cls(loss=mean(total_s, total_n), tokens=int(total_n),
                  long_loss=mean(long_s, long_n) if long_n else None, long_tokens=int(long_n))
        for i, name in enumerate(settings.domains):
            if count[i]:
                out.domain_loss[name], out.domain_tokens[name] = loss[i] / count[i], int(count[i])
        for j, label in enumerate(labels):
            s, n = loss[nd + j], count[nd + j]
            if n:
                out.position_loss[label], out.position_tokens[label] = s / n, int(n)
        return out


def run_validation(model: list, forward_backward: Callable, samples: list[PackedSample],
                   settings: ValidationSettings) -> ValidationResult:
    """Collective. Every rank passes the same samples; data-parallel ranks share them out."""
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    batches = [validation_batch(s, settings) for s in samples[rank::dp]]
    reports = forward_only(model, forward_backward, batches)
    local = torch.zeros(2, settings.columns, dtype=torch.float64)
    for report in reports:
        local += report["validation"].cpu()
    device = next(model[0].parameters()).device
    return ValidationResult.from_sums(sum_over_replicas(local, device).cpu(), settings)
