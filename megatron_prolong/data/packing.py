"""Packed training samples with document boundaries, and their collation into THD batches.

A ``PackedSample`` is exactly ``seq_length`` tokens made of one or more document segments.
Labels never cross a segment boundary: within a segment labels[i] = tokens[i+1]; the segment's
last position gets label ``pad_id`` and loss_mask 0. For SFT an extra *target mask* (1 on
assistant tokens incl. their <|eot_id|>) switches off the loss wherever the predicted token
(tokens[i+1]) is not an assistant token. Padding is its own segment with loss_mask 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class PackedSample:
    tokens: np.ndarray      # int64 [seq_length]
    labels: np.ndarray      # int64 [seq_length]
    loss_mask: np.ndarray   # float32 [seq_length]
    cu_seqlens: np.ndarray  # int32 [n_docs + 1], 0 ... seq_length
    domain: str

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[0])


def attention_cost(cu_seqlens: Sequence[int] | np.ndarray) -> int:
    """Cost of document-masked attention for one sample: sum over segments of length**2."""
    lens = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    return int((lens * lens).sum())


def build_sample(segments: Sequence[np.ndarray], seq_length: int, domain: str, pad_id: int,
                 target_masks: Optional[Sequence[np.ndarray]] = None) -> PackedSample:
    """Assemble document segments (token arrays) into one sample, padding the rest.

    ``target_masks`` (SFT): per segment, 1 where that token is a training target.
    """
    lens = np.fromiter((len(s) for s in segments), dtype=np.int64, count=len(segments))
    used = int(lens.sum())
    if used > seq_length:
        raise ValueError(f"segments hold {used} tokens, more than seq_length={seq_length}")
    if (lens <= 0).any():
        raise ValueError("empty document segment in a packed sample")
    pad = seq_length - used
    if pad:
        lens = np.append(lens, pad)
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])

    tokens = np.empty(seq_length, dtype=np.int64)
    if segments:
        np.concatenate(list(segments), out=tokens[:used], casting="unsafe")
    tokens[used:] = pad_id
    labels = np.empty_like(tokens)
    labels[:-1] = tokens[1:]
    ends = cu[1:] - 1
    labels[ends] = pad_id
    loss_mask = np.ones(seq_length, dtype=np.float32)
    loss_mask[ends] = 0.0
    if pad:
        loss_mask[used:] = 0.0
        labels[used:] = pad_id
    if target_masks is not None:
        target = np.zeros(seq_length, dtype=np.float32)
        if segments:
            np.concatenate(list(target_masks), out=target[:used], casting="unsafe")
        loss_mask[:-1] *= target[1:]
    return PackedSample(tokens, labels, loss_mask, cu, domain)


def collate_packed(samples: list[PackedSample], pad_to_multiple_of: int = 1) -> dict:
    """Concatenate a micro-batch of packed samples into ONE packed row (THD, batch dim 1).

    Returns torch tensors ``tokens``/``labels`` [1, T] int64, ``loss_mask`` [1, T] float32,
    ``cu_seqlens`` int32 [n+1] (cumulative *true* document lengths over the whole row),
    ``cu_seqlens_padded`` (int32 [n+1] or None), ``max_seqlen`` (int), ``domains`` (one per
    sample), ``num_loss_tokens`` (int, sum of loss_mask; for token-scaled loss).

    With ``pad_to_multiple_of`` = m > 1 (context parallelism needs every document padded to a
    multiple of 2*cp, times tp with sequence parallelism) each document segment is padded at its
    end to a multiple of m with pad tokens (label pad, loss_mask 0). This follows megatron-core's
    PackedSeqParams convention: tokens are laid out in the padded layout, ``cu_seqlens`` (for
    cu_seqlens_q/kv) holds the true lengths' cumulative sums, ``cu_seqlens_padded`` (for
    cu_seqlens_q_padded/kv_padded) the padded cumulative sums, ``max_seqlen`` is the largest
    padded length. With m == 1 ``cu_seqlens_padded`` is None and T = sum of seq_lengths.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    tokens = np.concatenate([s.tokens for s in samples])
    loss_mask = np.concatenate([s.loss_mask for s in samples])
    lens = np.concatenate([np.diff(s.cu_seqlens.astype(np.int64)) for s in samples])
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    batch = {
        "tokens": torch.from_numpy(tokens).unsqueeze(0),
        "labels": torch.from_numpy(np.concatenate([s.labels for s in samples])).unsqueeze(0),
        "loss_mask": torch.from_numpy(loss_mask).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "cu_seqlens_padded": None,
        "max_seqlen": int(lens.max()),
        "domains": [s.domain for s in samples],
        "num_loss_tokens": int(loss_mask.sum()),
    }
    if pad_to_multiple_of > 1:
        # The one padding routine, shared with the train step's context-parallel layout.
        from megatron_prolong.model.context_parallel import pad_documents

        # A sample's last position is always a segment end, whose label is pad_id.
        pad_id = int(samples[0].labels[-1])
        batch = pad_documents(batch, pad_to_multiple_of,
                              fill={"tokens": pad_id, "labels": pad_id})
        if batch["cu_seqlens_padded"] is None:  # every document already a multiple
            batch["cu_seqlens_padded"] = batch["cu_seqlens"].clone()
    return batch
