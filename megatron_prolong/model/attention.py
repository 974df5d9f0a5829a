"""Document-masked core attention for megatron-core's local (non-Transformer-Engine) layer spec.

megatron-core's own local DotProductAttention refuses packed sequences and context parallelism,
so this module takes its place in the layer spec. It receives what megatron's Attention hands a
core-attention module: query [t, heads, dim] and key/value [t, groups, dim] for packed sequences
(qkv_format 'thd' with cu_seqlens in PackedSeqParams), or [s, b, heads, dim] without them, and
returns [t, heads * dim] (or [s, b, heads * dim]). Attention is causal inside each document and
never crosses a document boundary.

Kernels (`model.local_attention_kernel`, resolved once per dtype and device):
- flash: flash-attn's varlen function (CUDA, bf16/fp16; ProLong's kernel).
- varlen: PyTorch's varlen attention, torch.nn.attention.varlen (CUDA, bf16/fp16).
- flex: FlexAttention with a document BlockMask built from cu_seqlens, torch.compile'd (CUDA).
  Tests run the same mask uncompiled on CPU (exact arithmetic over [heads, t, t] scores).
- cudnn: cuDNN's fused attention over the whole packed row in one call, document offsets on
  the device (model/cudnn_attention.py; CUDA sm90+, bf16/fp16, nvidia-cudnn-frontend).
- sdpa: scaled-dot-product attention per document (exact; any device and dtype).
- auto: on CUDA in bf16/fp16 the first of flex, flash, varlen that is available; else sdpa.
  cudnn joins auto (first) once the GPU kit's kernel check has held it to the fp32 reference on
  a GPU: until then it runs only when named.
None of them builds a dense [t, t] mask on the GPU.

Context parallelism (cp > 1): Ulysses. Each CP rank holds megatron's load-balanced slice of the
row; an all-to-all trades heads for sequence, the kernel above runs over the whole row for
h/cp heads, and a second all-to-all returns the output (see model/context_parallel.py).
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_prolong.config import LOCAL_ATTENTION_KERNELS, ConfigError
from megatron_prolong.model import cudnn_attention
from megatron_prolong.model.context_parallel import ulysses_attention

try:  # GPU clusters only
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[t, groups, d] -> [t, heads, d]; megatron orders query heads group by group."""
    groups = x.shape[-2]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=-2)


def _sdpa_takes_grouped_kv(q: torch.Tensor) -> bool:
    # Only SDPA's fused half-precision CUDA kernels take grouped K/V (enable_gqa); elsewhere
    # it falls back to the math kernel, [heads, L, L] scores (74 GiB at 64K in fp32).
    return q.is_cuda and q.dtype in HALF


def attention_per_document(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA on each [start, end) span of the packed row: exact, memory O(max doc^2).
    On CUDA SDPA picks cuDNN's fused kernel for long documents (the fastest measured on an
    H100 for rows of a few long documents: docs/performance.md); grouped K/V go in as they are
    (enable_gqa) rather than expanded."""
    heads = q.shape[1]
    gqa = {}
    if k.shape[1] != heads:
        if _sdpa_takes_grouped_kv(q):
            gqa = {"enable_gqa": True}
        else:
            k, v = _expand_groups(k, heads), _expand_groups(v, heads)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, **gqa)
        out[start:end] = od.squeeze(0).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, its parameter names), or None where this torch has no known version."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = set(inspect.signature(varlen_attn).parameters)
    if not params & {"window_size", "is_causal"}:  # an API this code does not know
        return None
    return varlen_attn, params


def _torch_varlen_attention(q, k, v, cu, max_seqlen, scale):
    varlen_attn, params = _torch_varlen()
    kwargs = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k, v = _expand_groups(k, q.shape[1]), _expand_groups(v, q.shape[1])
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


# ---------------------------------------------------------------------------------------------
# FlexAttention: a BlockMask for causal attention inside the documents of one packed row
# ---------------------------------------------------------------------------------------------
FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile; the block lists below are per tile


@functools.lru_cache(maxsize=1)
def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        return None
    return flex


def _document_mask_mod(doc: torch.Tensor):
    """mask_mod of FlexAttention: same document and causal. `doc` holds each position's
    document index (positions past the row's end form a document of their own)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


def document_block_mask(cu_seqlens: torch.Tensor, total: int,
                        block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention BlockMask for a packed row of `total` tokens laid out by `cu_seqlens`.

    Built from the document layout per tile, never from a [total, total] mask: with documents
    contiguous and in order, query tile i sees key tile j < i iff the last document of j is
    the first document of i, and sees all of it ("full": mask_mod skipped) iff both tiles lie
    inside one document; diagonal tiles are partial. O((total / block_size)**2) work.
    """
    flex = _flex_module()
    cu = cu_seqlens.to(torch.int64)
    n = -(-total // block_size)
    pos = torch.arange(n * block_size, device=cu.device)
    # searchsorted skips zero-length documents; positions >= cu[-1] get index len(cu) - 1.
    doc = torch.searchsorted(cu[1:], pos, right=True)
    first, last = doc[::block_size], doc[block_size - 1::block_size]
    below = torch.ones(n, n, dtype=torch.bool, device=cu.device).tril(-1)  # key tile j < i
    seen = below & (last[None, :] == first[:, None])
    full = below & (first[None, :] == last[:, None])
    partial = (seen & ~full) | torch.eye(n, dtype=torch.bool, device=cu.device)

    def ordered(dense):  # (count, indices listed first) per query tile, as BlockMask wants
        count = dense.sum(-1, dtype=torch.int32)
        indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
        return count[None, None], indices.to(torch.int32)[None, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return flex.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                         BLOCK_SIZE=block_size, mask_mod=_document_mask_mod(doc),
                                         seq_lengths=(total, total))


class _LastBlockMask:
    """The BlockMask of the last cu_seqlens tensor seen: every layer of a forward (and its
    recomputation) gets the same PackedSeqParams tensor, so the mask is built once per row.
    Holds the tensor weakly and checks its version, so a new or changed row never matches."""

    def __init__(self) -> None:
        self._ref, self._key, self._mask = None, None, None

    def get(self, cu_seqlens: torch.Tensor, total: int):
        key = (cu_seqlens._version, total, FLEX_BLOCK_SIZE)
        if self._ref is None or self._ref() is not cu_seqlens or self._key != key:
            mask = document_block_mask(cu_seqlens.to(torch.int32), total, FLEX_BLOCK_SIZE)
            self._ref, self._key, self._mask = weakref.ref(cu_seqlens), key, mask
        return self._mask


_last_block_mask = _LastBlockMask()


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # One compiled kernel for every layer and row of a fixed length; new BlockMasks are inputs.
    # Each further row length (evaluation lengths, say) compiles once more; past dynamo's
    # recompile limit (8 by default) it would run flex eagerly, materializing [heads, t, t]
    # scores (out of memory at 64K), so the limit is raised to cover many lengths.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def flex_document_attention(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """[t, heads, d] queries, [t, groups, d] keys/values -> [t, heads, d], FlexAttention."""
    flex = _flex_module()
    block_mask = _last_block_mask.get(cu_seqlens, q.shape[0])
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, n, t, d]
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda:
        out = _compiled_flex_attention()(qb, kb, vb, block_mask=block_mask, scale=scale,
                                         enable_gqa=gqa)
    else:  # eager: exact reference arithmetic (CPU tests); warns that it is not fused
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without")
            out = flex.flex_attention(qb, kb, vb, block_mask=block_mask, scale=scale,
                                      enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Choosing the kernel
# ---------------------------------------------------------------------------------------------
HALF = (torch.float16, torch.bfloat16)
# On CUDA in bf16/fp16. "cudnn" goes first here once `tools/gpu_kit/run.sh OUT --quick` has
# checked it against the fp32 reference on a GPU (issue 18): its glue is tested on CPU against
# a recorded contract only, and a default must not be a kernel that has never run.
AUTO_ORDER = ("flex", "flash", "varlen")


def kernel_unavailable(name: str, device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why kernel `name` cannot run on this device and dtype, or None when it can."""
    if name == "sdpa":
        return None
    if name == "cudnn":
        return cudnn_attention.unavailable(device_type, dtype)
    if name == "flex":
        if _flex_module() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device_type != "cuda":  # flex_document_attention itself runs there (tests)
            return "FlexAttention trains on CUDA only (PyTorch has no CPU backward for it)"
        return None
    if name not in ("flash", "varlen"):
        raise ValueError(f"unknown attention kernel {name!r}")
    if device_type != "cuda" or dtype not in HALF:
        return f"runs on CUDA in bf16/fp16 only (here: {device_type}, {dtype})"
    if name == "flash" and flash_attn_varlen_func is None:
        return "flash-attn is not installed (pip install flash-attn, or the NGC container)"
    if name == "varlen" and _torch_varlen() is None:
        return f"torch {torch.__version__} has no known torch.nn.attention.varlen.varlen_attn"
    return None


@functools.lru_cache(maxsize=None)
def resolve_kernel(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """The kernel that runs for `model.local_attention_kernel=requested`; an explicit choice
    that cannot run here is a ConfigError (exit status 2), never a silent substitute."""
    if requested == "auto":
        if device_type == "cuda" and dtype in HALF:
            # FlexAttention first: it beat
            # FlashAttention-2-class varlen kernels by 9% tokens/s in training at 64K
            # (docs/performance.md).
            for name in AUTO_ORDER:
                if kernel_unavailable(name, device_type, dtype) is None:
                    return name
        return "sdpa"
    if requested not in LOCAL_ATTENTION_KERNELS:
        raise ConfigError(f"model.local_attention_kernel={requested!r}: choose "
                          f"{', '.join(LOCAL_ATTENTION_KERNELS)}")
    reason = kernel_unavailable(requested, device_type, dtype)
    if reason:
        raise ConfigError(f"model.local_attention_kernel={requested}: {reason}; choose another "
                          "kernel or auto")
    return requested


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen: Optional[int], scale: float,
                            kernel: str = "auto"):
    """Causal attention within each document of a packed row, on `kernel` (resolved here)."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    name = resolve_kernel(kernel, q.device.type, q.dtype)
    if name in ("flash", "varlen") and max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    if name == "flash":
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
        )
    if name == "varlen":
        return _torch_varlen_attention(q, k, v, cu, max_seqlen, scale)
    if name == "flex":
        return flex_document_attention(q, k, v, cu_seqlens.to(q.device), scale)
    if name == "cudnn":
        return cudnn_attention.cudnn_document_attention(q, k, v, cu, scale, max_seqlen)
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
        kernel: str = "auto",
    ):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("DocumentMaskedAttention does not implement attention dropout; "
                             "set attention_dropout=0 (ProLong trains without dropout).")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.layer_number = layer_number
        self.pg_collection = pg_collection
        self.kernel = kernel
        # Refuse a kernel that cannot run here when the model is built, not at the first step.
        on_cuda = torch.cuda.is_available() and not config.use_cpu_initialization
        resolve_kernel(kernel, "cuda" if on_cuda else "cpu", config.params_dtype)

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
                                   scale=self.softmax_scale, kernel=self.kernel)
        if cp_group is None:
            out = attend(query, key, value)
        else:
            out = ulysses_attention(query, key, value, cu, cp_group, attend)
        return out.reshape(out.shape[0], -1)
