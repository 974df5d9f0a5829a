"""Document-masked core attention for megatron-core's local (non-Transformer-Engine) layer spec.

megatron-core's own local DotProductAttention refuses packed sequences and context parallelism,
so this module takes its place in the layer spec. It receives what megatron's Attention hands a
core-attention module: query [t, heads, dim] and key/value [t, groups, dim] for packed sequences
(qkv_format 'thd' with cu_seqlens in PackedSeqParams), or [s, b, heads, dim] without them, and
returns [t, heads * dim] (or [s, b, heads * dim]). Attention is causal inside each document and
never crosses a document boundary.

Kernels, picked once per call by what the tensors live on:
- CUDA: flash-attn's varlen function when installed, else PyTorch's varlen attention, else
  scaled-dot-product attention per document. No dense [t, t] mask is ever built.
- CPU: scaled-dot-product attention per document (exact; no [t, t] mask either).

Context parallelism (cp > 1): Ulysses. Each CP rank holds megatron's load-balanced slice of the
row; an all-to-all trades heads for sequence, the kernel above runs over the whole row for
h/cp heads, and a second all-to-all returns the output (see model/context_parallel.py).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_prolong.model.context_parallel import ulysses_attention

try:  # GPU clusters only
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[t, groups, d] -> [t, heads, d]; megatron orders query heads group by group."""
    groups = x.shape[-2]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=-2)


def attention_per_document(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA on each [start, end) span of the packed row: exact, memory O(max doc^2)."""
    heads = q.shape[1]
    k, v = _expand_groups(k, heads), _expand_groups(v, heads)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        out[start:end] = od.squeeze(0).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def _torch_varlen_attention(q, k, v, cu, max_seqlen, scale):
    varlen_attn, params = _torch_varlen()
    kwargs = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:  # an API this code does not know: let the caller fall back
        raise NotImplementedError
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k, v = _expand_groups(k, q.shape[1]), _expand_groups(v, q.shape[1])
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen: Optional[int], scale: float):
    """Causal attention within each document of a packed row, on the best available kernel."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if q.is_cuda:
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(
                q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
            )
        if _torch_varlen() is not None and q.dtype in (torch.float16, torch.bfloat16):
            try:
                return _torch_varlen_attention(q, k, v, cu, max_seqlen, scale)
            except NotImplementedError:
                pass
    return attention_per_document(q, k, v, cu, scale)


class DocumentMaskedAttention(MegatronModule):
    """Core attention that honours PackedSeqParams (document boundaries) without TE."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("DocumentMaskedAttention does not implement attention dropout; "
                             "set attention_dropout=0 (ProLong trains without dropout).")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.layer_number = layer_number
        self.pg_collection = pg_collection

    def _cp_group(self):
        group = getattr(self.pg_collection, "cp", None) if self.pg_collection is not None else None
        if group is None:
            group = parallel_state.get_context_parallel_group(check_initialized=False)
        return group if group is not None and group.size() > 1 else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("DocumentMaskedAttention does not take an attention bias")
        cp_group = self._cp_group()
        if packed_seq_params is None:
            if cp_group is not None:
                raise ValueError("context parallelism on the local attention path needs packed "
                                 "(THD) batches with cu_seqlens; pass packed_seq_params")
            # [s, b, n, d]: one causal sequence per batch row.
            s, b, n, d = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
            )
            return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must use qkv_format 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        # Padded offsets (context parallelism pads every document) lay out the row; pads sit at
        # each document's end, so causal attention keeps real tokens from ever seeing them.
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        attend = functools.partial(varlen_causal_attention, cu_seqlens=cu,
                                   max_seqlen=packed_seq_params.max_seqlen_q,
                                   scale=self.softmax_scale)
        if cp_group is None:
            out = attend(query, key, value)
        else:
            out = ulysses_attention(query, key, value, cu, cp_group, attend)
        return out.reshape(out.shape[0], -1)
