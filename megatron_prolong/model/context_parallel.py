"""Context parallelism (CP): splitting packed rows across CP ranks, and the Ulysses exchange.

Both attention paths see the sequence split the way megatron-core expects (its RoPE for THD and
Transformer Engine's CP kernels assume it): every document is padded to a multiple of 2*cp
(times tp with sequence parallelism), cut into 2*cp equal chunks, and CP rank r holds chunks
r and 2*cp-1-r of every document ("load-balanced": causal attention costs the same on every
rank). The model receives this rank's tokens plus the *global* cu_seqlens / cu_seqlens_padded.

- TE path: TEDotProductAttention does the CP communication itself (p2p ring, a2a, all_gather,
  a2a+p2p); `te_context_parallel_kwargs` turns the config into megatron-core settings.
- Project path: `ulysses_attention` exchanges heads for sequence (all-to-all), undoes the
  load-balanced permutation so every document is contiguous again, runs the document-masked
  kernel over the whole row for this rank's heads, and sends the result back.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prolong.config import hierarchical_cp_sizes

TE_COMM_TYPES = {"p2p": "p2p", "a2a": "a2a", "allgather": "all_gather", "a2a+p2p": "a2a+p2p"}


# ---------------------------------------------------------------------------------------------
# Padding and splitting (CPU or GPU tensors; no communication)
# ---------------------------------------------------------------------------------------------
def cp_pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every document's length must be a multiple of (1 without CP: sequence
    parallelism alone needs only the row length divisible by tp)."""
    return 2 * cp * (tp if sequence_parallel else 1) if cp > 1 else 1


def _per_token_keys(batch: dict) -> list[str]:
    """tokens, labels, loss_mask and any other [1, T] tensor (e.g. per-token domain ids)."""
    t = batch["tokens"].shape[1]
    return [k for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == t]


def pad_documents(batch: dict, multiple: int, fill: Optional[dict] = None) -> dict:
    """Pad every document of a packed row at its end to a multiple of `multiple`.

    Returns the batch unchanged when its layout already satisfies the rule. Pad positions of
    every per-token tensor get `fill[key]` (default 0: token 0, label 0, loss_mask 0); they sit
    after each document's last token, so causal attention never lets a real token see them.
    `cu_seqlens` keeps the true lengths, `cu_seqlens_padded` the padded ones (megatron-core's
    PackedSeqParams convention).
    """
    cu_true = batch["cu_seqlens"].to(torch.int64).cpu()
    cu_now = batch.get("cu_seqlens_padded")
    cu_now = cu_true if cu_now is None else cu_now.to(torch.int64).cpu()
    lens_now = cu_now[1:] - cu_now[:-1]
    if multiple <= 1 or bool((lens_now % multiple == 0).all()):
        return batch
    true_lens = cu_true[1:] - cu_true[:-1]
    plens = (true_lens + multiple - 1) // multiple * multiple
    cu_pad = torch.zeros_like(cu_true)
    cu_pad[1:] = torch.cumsum(plens, 0)
    # Source positions: the true tokens wherever they sit now (start of each current segment).
    src = torch.repeat_interleave(cu_now[:-1], true_lens) + _offsets(true_lens)
    dst = torch.repeat_interleave(cu_pad[:-1], true_lens) + _offsets(true_lens)
    out = dict(batch)
    total = int(cu_pad[-1])
    for key in _per_token_keys(batch):
        x = batch[key]
        y = x.new_full((x.shape[0], total), (fill or {}).get(key, 0))
        y[:, dst.to(x.device)] = x[:, src.to(x.device)]
        out[key] = y
    out["cu_seqlens_padded"] = cu_pad.to(torch.int32)
    out["max_seqlen"] = int(plens.max())
    if "num_loss_tokens" in batch:
        out["num_loss_tokens"] = int(out["loss_mask"].sum())
    return out


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    """[0..l0-1, 0..l1-1, ...] for document lengths `lens`."""
    starts = torch.cumsum(lens, 0) - lens
    return torch.arange(int(lens.sum()), device=lens.device) - torch.repeat_interleave(starts, lens)


def cp_owner(cu_seqlens_padded: torch.Tensor, cp: int, total: Optional[int] = None) -> torch.Tensor:
    """The CP rank that holds each position of the padded row (megatron's load-balanced split).

    Vectorized; given `total` (the row length) it never synchronizes with the GPU, so
    attention can call it every layer.
    """
    cu = cu_seqlens_padded.to(torch.int64)
    pos = torch.arange(int(cu[-1]) if total is None else total, device=cu.device)
    doc = torch.searchsorted(cu[1:], pos, right=True)  # zero-length documents are skipped
    start, length = cu[doc], cu[doc + 1] - cu[doc]
    chunk = (pos - start) * (2 * cp) // length
    return torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)


def cp_partition_indices(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Padded-row positions CP rank `rank` holds, in its local order (ascending: for every
    document chunk r, then chunk 2*cp-1-r, each in token order)."""
    return torch.nonzero(cp_owner(cu_seqlens_padded, cp) == rank).squeeze(1)


def cp_gather_order(cu_seqlens_padded: torch.Tensor, cp: int,
                    total: Optional[int] = None) -> torch.Tensor:
    """perm such that concatenating every rank's local tokens (rank 0 first) gives
    padded_row[perm]: rank-major, each rank's positions ascending."""
    return torch.argsort(cp_owner(cu_seqlens_padded, cp, total), stable=True)


def split_batch_for_cp_rank(batch: dict, cp: int, rank: int,
                            multiple: Optional[int] = None) -> dict:
    """This CP rank's share of a packed micro-batch (THD, batch dim 1).

    Documents are padded first when needed (pad_documents). tokens/labels/loss_mask (every
    [1, T] tensor) become this rank's positions; `position_ids` holds their positions in the
    padded row; cu_seqlens, cu_seqlens_padded and max_seqlen stay global (megatron-core and TE
    expect them so); num_loss_tokens counts this rank's loss tokens. A rank whose tokens
    are all masked gets loss sum 0 and count 0: loss sums and counts are reduced across the
    data x context group, never divided per rank, so no NaN appears.
    """
    multiple = multiple or cp_pad_multiple(cp)
    batch = pad_documents(batch, multiple)
    if cp == 1:
        if "position_ids" not in batch:
            batch = {**batch, "position_ids": torch.arange(batch["tokens"].shape[1])[None]}
        return batch
    cu_pad = batch.get("cu_seqlens_padded")
    if cu_pad is None:  # already a multiple: the true layout is the padded one
        cu_pad = batch["cu_seqlens"]
    idx = cp_partition_indices(cu_pad.cpu(), cp, rank)
    out = dict(batch)
    for key in _per_token_keys(batch):
        out[key] = batch[key][:, idx.to(batch[key].device)]
    out["position_ids"] = idx[None]
    out["cu_seqlens_padded"] = cu_pad.to(torch.int32)
    out["max_seqlen"] = int((cu_pad[1:] - cu_pad[:-1]).max())
    out["num_loss_tokens"] = int(out["loss_mask"].sum())
    return out


def pad_microbatches(microbatches: list[dict], config) -> list[dict]:
    """Pad each micro-batch's documents for the CP layout of megatron-core `config`; with
    pipeline parallelism, rows of different padded lengths switch on
    config.variable_seq_lengths (stages then exchange shapes before activations)."""
    multiple = cp_pad_multiple(config.context_parallel_size, config.tensor_model_parallel_size,
                               config.sequence_parallel)
    padded = [pad_documents(mb, multiple) for mb in microbatches]
    if len({int(mb["tokens"].shape[1]) for mb in padded}) > 1:
        config.variable_seq_lengths = True
    return padded


def share_unpadded_offsets(batch: dict) -> dict:
    """The batch with `cu_seqlens_padded` replaced by the `cu_seqlens` tensor itself where no
    document needed padding (values compared on the host, before the batch moves to the GPU):
    Transformer Engine runs slower when equal offsets come in two tensors (TE issue 3487)."""
    cu, cu_padded = batch["cu_seqlens"], batch.get("cu_seqlens_padded")
    if cu_padded is None or cu_padded is cu:
        return batch
    if cu.device.type == "cpu" and cu_padded.device.type == "cpu" and torch.equal(
            cu.to(torch.int64), cu_padded.to(torch.int64)):
        return {**batch, "cu_seqlens_padded": cu}
    return batch


def packed_seq_params(batch: dict, device) -> PackedSeqParams:
    """megatron-core's THD description of a packed row: cu_seqlens (true lengths) and
    cu_seqlens_padded (under CP the padded ones); both global even on a CP rank that holds a
    share of the row. Without padding both are the same tensor object (TE issue 3487)."""
    cu = batch["cu_seqlens"].to(device=device, dtype=torch.int32)
    cu_padded = share_unpadded_offsets(batch).get("cu_seqlens_padded")
    if cu_padded is None or cu_padded is batch["cu_seqlens"]:
        cu_padded = cu
    else:
        cu_padded = cu_padded.to(device=device, dtype=torch.int32)
    max_seqlen = int(batch.get("max_seqlen") or int((cu[1:] - cu[:-1]).max()))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def batch_for_this_cp_rank(batch: dict, config) -> dict:
    """The share of `batch` that this process's CP rank feeds to the model."""
    cp = config.context_parallel_size
    multiple = cp_pad_multiple(cp, config.tensor_model_parallel_size, config.sequence_parallel)
    rank = parallel_state.get_context_parallel_rank() if cp > 1 else 0
    return split_batch_for_cp_rank(batch, cp, rank, multiple)


def forward_packed_row(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """One packed micro-batch through `model` (a GPTModel chunk, or a wrapper of one) with its
    labels, as megatron's schedules call a forward step (training and evaluation alike).

    Returns (this CP rank's share of the row with every tensor on the model's device, the
    model's output: per-token losses on the last pipeline stage, activations elsewhere).
    """
    batch = share_unpadded_offsets(batch_for_this_cp_rank(batch, model.config))
    device = next(model.parameters()).device
    moved: dict = {}  # by identity: cu_seqlens_padded may be cu_seqlens itself

    def to_device(v):
        if id(v) not in moved:
            moved[id(v)] = v.to(device)
        return moved[id(v)]

    batch = {k: to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=packed_seq_params(batch, device))
    return batch, output


# ---------------------------------------------------------------------------------------------
# Ulysses exchange (project attention path)
# ---------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 chunks. Its adjoint is the same exchange (a transpose of
    the (rank, chunk) grid), so backward reuses it. gloo (CPU) and NCCL both implement it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def kv_replication(groups: int, heads: int, cp: int) -> int:
    """How many times to repeat each KV group so that cp ranks get whole groups, as few as
    possible: lcm(groups, cp) / groups (1 when cp divides the groups)."""
    if heads % cp:
        raise ValueError(f"Ulysses context parallelism: context={cp} must divide the attention "
                         f"heads per tensor-parallel rank ({heads})")
    return math.lcm(groups, cp) // groups


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    group,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Document-masked attention over the whole row, heads split across the CP group.

    query [t, h, d], key/value [t, g, d]: this rank's t = T/cp tokens (load-balanced order).
    `attend(q, k, v)` runs on [T, h/cp, d] and [T, g'/cp, d] in padded-row order.
    Returns [t, h, d]. One all-to-all carries q, k and v together; one carries the output back.
    """
    cp = dist.get_world_size(group)
    t, heads, dim = query.shape
    rep = kv_replication(key.shape[1], heads, cp)
    if rep > 1:  # megatron orders query heads group by group: repeat groups in place
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    hq, hk = heads // cp, key.shape[1] // cp
    packed = torch.cat([x.reshape(t, cp, -1, dim) for x in (query, key, value)], dim=2)
    packed = _AllToAll.apply(packed.transpose(0, 1), group)  # [cp(source rank), t, n, d]
    perm = cp_gather_order(cu_seqlens_padded.to(query.device), cp, total=cp * t)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    full = packed.reshape(cp * t, -1, dim)[inverse]  # padded-row order: documents contiguous
    q, k, v = full.split([hq, hk, hk], dim=1)
    out = attend(q, k, v).reshape(cp * t, hq, dim)
    back = _AllToAll.apply(out[perm].reshape(cp, t, hq, dim), group)  # [cp(head chunk), t, ...]
    return back.transpose(0, 1).reshape(t, heads, dim)


# ---------------------------------------------------------------------------------------------
# Transformer Engine path settings
# ---------------------------------------------------------------------------------------------
def te_context_parallel_kwargs(cp: int, cp_comm_type: str) -> dict:
    """TransformerConfig fields for TE's context parallelism (empty without CP).

    THD batches make megatron-core switch TE's mask to 'padding_causal' by itself; what must
    come from here is the communication type under TE's spelling and, for a2a+p2p, the
    hierarchical group sizes (parallel_state must be initialised with the same sizes).
    """
    if cp <= 1:
        return {}
    if cp_comm_type not in TE_COMM_TYPES:
        raise ValueError(f"parallel.cp_comm_type={cp_comm_type!r}: choose one of "
                         f"{', '.join(TE_COMM_TYPES)}")
    kwargs = {"cp_comm_type": TE_COMM_TYPES[cp_comm_type]}
    if cp_comm_type == "a2a+p2p":
        kwargs["hierarchical_context_parallel_sizes"] = hierarchical_cp_sizes(cp)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Planning: communication volume (docs/context_parallel.md)
# ---------------------------------------------------------------------------------------------
def cp_comm_bytes_per_layer(seq_length: int, cp: int, heads: int, groups: int, head_dim: int,
                            comm_type: str = "a2a", bytes_per_element: int = 2) -> int:
    """Bytes one GPU sends per transformer layer, forward + backward, for attention's CP
    exchange (TP = 1; no recomputation). a2a is Ulysses (the local path, or TE's a2a)."""
    if cp <= 1:
        return 0
    local = seq_length // cp
    kv = 2 * groups * head_dim  # K and V per token
    if comm_type == "a2a":
        groups = groups * kv_replication(groups, heads, cp)
        per_token = 2 * heads * head_dim + 2 * groups * head_dim  # q, k, v in; output back
        elements = 2 * (cp - 1) * local // cp * per_token  # backward mirrors forward
    elif comm_type == "p2p":  # ring: KV visits every rank; backward sends KV and dKV
        elements = 3 * (cp - 1) * local * kv
    elif comm_type == "allgather":  # all-gather KV, reduce-scatter dKV
        elements = 2 * (cp - 1) * local * kv
    else:
        raise ValueError(f"comm_type={comm_type!r}: choose a2a, p2p or allgather")
    return elements * bytes_per_element
