"""Causal attention inside the documents of one packed row in ONE cuDNN fused-attention call.

The kernel is cuDNN's fused flash attention (what SDPA per document and Transformer Engine's
fused attention reach), driven through nvidia-cudnn-frontend's graph API (`cudnn.pygraph`:
`sdpa` / `sdpa_backward`) with ragged offsets, so that the row's documents are one batch of
variable-length sequences read in place from megatron's THD tensors:
- q, o, dO, dQ: [t, heads, d] contiguous -> cuDNN dims (B, heads, S, d), strides
  (S*heads*d, d, heads*d, 1), ragged offset of document b = cu[b] * heads * d (ELEMENTS);
- k, v, dK, dV: the same with the K/V groups (grouped K/V are never expanded);
- softmax stats: [t, heads] fp32, ragged offset cu[b] * heads;
- seq_len_q = seq_len_kv = cu[b+1] - cu[b], shaped (B, 1, 1, 1) int32; offsets (B+1, 1, 1, 1)
  int32, or int64 where t * heads * d reaches 2**31 (a 512K row with 32 heads of 128).
B is the number of documents rounded up to a power of two with empty documents, and S (the
longest document cuDNN must expect: it launches work for B x heads x S) is the row's
`max_seqlen` (a host integer of PackedSeqParams) rounded up to a power of two, at most t (t
when unknown): a graph depends only on (t, B bucket, S bucket, widths, dtype, scale), so rows
with new document layouts reuse the few built. Every offset is computed on the device from
cu_seqlens: nothing is read back to the host, per layer or per row. As for the flash and varlen
kernels, cu_seqlens must end at the row's end (every batch of this project does).

Why not `cudnn.experimental.ops.scaled_dot_product_attention` (1.26.0), which takes
`cumulative_seq_len_q/kv`: its source shares one offset tensor between q, o, dO and the stats
(their element strides differ: heads * d vs heads), allocates o and the stats as padded
(B, heads, S, d) / (B, heads, S, 1) BHSD tensors while offsetting them raggedly, forces int32
offsets, and reads `seq_len_q.sum().item()` (a host synchronisation) whenever it builds a
backward graph; its own tests never exercise the ragged path. The graph API it wraps has none of
these limits, so this module builds the graph itself (docs/performance.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

MIN_CUDNN = 90600  # cudnn.backend_version() of 9.6.0
# Tensor ids of the graphs (the variant pack maps them to torch tensors).
Q, K, V, O, STATS, DO, DQ, DK, DV = 1, 2, 3, 4, 5, 6, 7, 8, 9
SEQ_LEN, OFF_Q, OFF_KV, OFF_STATS = 10, 11, 12, 13


@functools.lru_cache(maxsize=1)
def frontend():
    """The `cudnn` module of nvidia-cudnn-frontend, or None where it does not import."""
    try:
        import cudnn  # type: ignore
    except Exception:  # ImportError, or a missing CUDA/cuDNN library behind the binary module
        return None
    return cudnn if hasattr(cudnn, "pygraph") else None


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def document_batch(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Boundaries of the cuDNN batch: cu_seqlens, then empty documents at the row's end up to a
    power-of-two count. Built on the device without reading cu_seqlens back."""
    cu = cu_seqlens.to(torch.int64)
    docs = cu.numel() - 1
    return torch.cat([cu, cu[-1:].expand(_power_of_two(docs) - docs)])


@dataclass(frozen=True)
class RowShape:
    """What a graph depends on (its cache key)."""
    total: int  # tokens of the row
    batch: int  # documents, bucketed (B)
    longest: int  # the longest document, bucketed (S)
    heads: int
    groups: int
    head_dim: int
    dtype: torch.dtype
    scale: float

    @property
    def offset_dtype(self) -> torch.dtype:
        # Offsets reach total * heads * head_dim elements: 2**31 at 512K x 32 x 128.
        return torch.int64 if self.total * self.heads * self.head_dim >= 2**31 else torch.int32


def ragged_arguments(bounds: torch.Tensor, shape: RowShape) -> dict:
    """Device tensors of the variant pack that describe the documents (see the module doc)."""
    column = lambda x: x.reshape(-1, 1, 1, 1)  # noqa: E731  (B[+1], 1, 1, 1)
    off = shape.offset_dtype
    return {
        SEQ_LEN: column((bounds[1:] - bounds[:-1]).to(torch.int32)),
        OFF_Q: column((bounds * (shape.heads * shape.head_dim)).to(off)),
        OFF_KV: column((bounds * (shape.groups * shape.head_dim)).to(off)),
        OFF_STATS: column((bounds * shape.heads).to(off)),
    }


def _packed(n: int, shape: RowShape) -> tuple[list, list]:
    """cuDNN dims and strides of a [t, n, d] tensor seen as (B, n, S, d)."""
    s, d = shape.longest, shape.head_dim
    return [shape.batch, n, s, d], [s * n * d, d, n * d, 1]


def _stats_layout(shape: RowShape) -> tuple[list, list]:
    s, h = shape.longest, shape.heads
    return [shape.batch, h, s, 1], [s * h, 1, h, 1]


class _GraphBuilder:
    """Builds the forward and backward graphs of a RowShape (cuDNN's graph API)."""

    def __init__(self, cudnn, handle, shape: RowShape):
        self.cudnn, self.shape = cudnn, shape
        io = {torch.float16: cudnn.data_type.HALF,
              torch.bfloat16: cudnn.data_type.BFLOAT16}[shape.dtype]
        self.io = io
        self.graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                                   compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        off = (cudnn.data_type.INT64 if shape.offset_dtype == torch.int64
               else cudnn.data_type.INT32)
        b = shape.batch
        g = self.graph
        self.seq_len = g.tensor(name="seq_len", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1],
                                data_type=cudnn.data_type.INT32, uid=SEQ_LEN)
        self.offsets = {uid: g.tensor(name=f"offset_{uid}", dim=[b + 1, 1, 1, 1],
                                      stride=[1, 1, 1, 1], data_type=off, uid=uid)
                        for uid in (OFF_Q, OFF_KV, OFF_STATS)}

    def _io(self, name: str, uid: int, n: int):
        dim, stride = _packed(n, self.shape)
        t = self.graph.tensor(name=name, dim=dim, stride=stride, data_type=self.io, uid=uid)
        t.set_ragged_offset(self.offsets[OFF_Q if n == self.shape.heads else OFF_KV])
        return t

    def _output(self, t, uid: int, n: int):
        dim, stride = _packed(n, self.shape)
        t.set_uid(uid).set_output(True).set_dim(dim).set_stride(stride).set_data_type(self.io)
        t.set_ragged_offset(self.offsets[OFF_Q if n == self.shape.heads else OFF_KV])

    def _stats(self, uid: int):
        dim, stride = _stats_layout(self.shape)
        t = self.graph.tensor(name="stats", dim=dim, stride=stride,
                              data_type=self.cudnn.data_type.FLOAT, uid=uid)
        t.set_ragged_offset(self.offsets[OFF_STATS])
        return t

    def _mask(self) -> dict:
        # Causal from each document's first token: top-left diagonal, nothing to its right.
        return dict(use_padding_mask=True, seq_len_q=self.seq_len, seq_len_kv=self.seq_len,
                    diagonal_alignment=self.cudnn.diagonal_alignment.TOP_LEFT,
                    diagonal_band_right_bound=0, attn_scale=self.shape.scale)

    def _finish(self):
        g, heur = self.graph, self.cudnn.heur_mode
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([heur.A, heur.FALLBACK])
        g.check_support()
        g.build_plans()
        return g, g.get_workspace_size()

    def forward(self):
        h, kv = self.shape.heads, self.shape.groups
        q, k, v = self._io("q", Q, h), self._io("k", K, kv), self._io("v", V, kv)
        o, stats = self.graph.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True,
                                   compute_data_type=self.cudnn.data_type.FLOAT, **self._mask())
        self._output(o, O, h)
        dim, stride = _stats_layout(self.shape)
        stats.set_uid(STATS).set_output(True).set_dim(dim).set_stride(stride)
        stats.set_data_type(self.cudnn.data_type.FLOAT)
        stats.set_ragged_offset(self.offsets[OFF_STATS])
        return self._finish()

    def backward(self):
        h, kv = self.shape.heads, self.shape.groups
        q, k, v = self._io("q", Q, h), self._io("k", K, kv), self._io("v", V, kv)
        o, do = self._io("o", O, h), self._io("dO", DO, h)
        # The ragged backward sizes its scratch by the batch's total tokens: known here (t)
        # without reading seq_len back, rounded up to cuDNN's 64-token tiles.
        tiles = -(-self.shape.total // 64) * 64
        dq, dk, dv = self.graph.sdpa_backward(
            name="sdpa_backward", q=q, k=k, v=v, o=o, dO=do, stats=self._stats(STATS),
            max_total_seq_len_q=tiles, max_total_seq_len_kv=tiles, **self._mask())
        self._output(dq, DQ, h)
        self._output(dk, DK, kv)
        self._output(dv, DV, kv)
        return self._finish()


class _Graphs:
    """Built graphs by (direction, RowShape, device): a row of a known shape builds nothing."""

    def __init__(self):
        self._built: dict = {}
        self._handles: dict = {}

    def handle(self, cudnn, device: torch.device):
        if device not in self._handles:
            self._handles[device] = cudnn.create_handle()
        handle = self._handles[device]
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        cudnn.set_stream(handle=handle, stream=stream)
        return handle

    def get(self, cudnn, direction: str, shape: RowShape, device: torch.device):
        handle = self.handle(cudnn, device)
        key = (direction, shape, device)
        if key not in self._built:
            builder = _GraphBuilder(cudnn, handle, shape)
            self._built[key] = getattr(builder, direction)()
        graph, workspace = self._built[key]
        return graph, workspace, handle

    def execute(self, cudnn, direction: str, shape: RowShape, pack: dict, device):
        graph, workspace_size, handle = self.get(cudnn, direction, shape, device)
        workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
        graph.execute(pack, workspace, handle=handle)

    def __len__(self) -> int:
        return len(self._built)


graphs = _Graphs()


class _PackedRowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, shape: RowShape):
        cudnn = frontend()
        ragged = ragged_arguments(bounds, shape)
        o = torch.empty_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], 1, dtype=torch.float32, device=q.device)
        graphs.execute(cudnn, "forward", shape, {Q: q, K: k, V: v, O: o, STATS: stats, **ragged},
                       q.device)
        ctx.save_for_backward(q, k, v, o, stats, bounds)
        ctx.shape = shape
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, o, stats, bounds = ctx.saved_tensors
        shape = ctx.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pack = {Q: q, K: k, V: v, O: o, DO: grad_out.contiguous(), STATS: stats,
                DQ: dq, DK: dk, DV: dv, **ragged_arguments(bounds, shape)}
        graphs.execute(frontend(), "backward", shape, pack, q.device)
        return dq, dk, dv, None, None


def cudnn_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: torch.Tensor, scale: float,
                             max_seqlen: Optional[int] = None) -> torch.Tensor:
    """[t, heads, d] queries, [t, groups, d] keys/values -> [t, heads, d]: causal attention
    inside each document of the packed row laid out by cu_seqlens (ending at t; its longest
    document `max_seqlen` tokens, when known), one cuDNN call."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    total, heads, head_dim = q.shape
    bounds = document_batch(cu_seqlens.to(q.device))
    longest = total if max_seqlen is None else min(total, _power_of_two(int(max_seqlen)))
    shape = RowShape(total=total, batch=bounds.numel() - 1, longest=longest, heads=heads,
                     groups=k.shape[1], head_dim=head_dim, dtype=q.dtype, scale=float(scale))
    return _PackedRowAttention.apply(q, k, v, bounds, shape)


def device_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def unavailable(device_type: str, dtype: torch.dtype,
                capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why the cuDNN kernel cannot run here, or None."""
    if frontend() is None:
        return ("nvidia-cudnn-frontend is not installed or does not import (pip install "
                "nvidia-cudnn-frontend; the GPU kit carries 1.26.0)")
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return f"runs on CUDA in bf16/fp16 only (here: {device_type}, {dtype})"
    if capability is None and not torch.cuda.is_available():
        return "runs on CUDA only (no GPU visible)"
    if capability is None:
        capability = device_capability()
    if capability < (9, 0):
        return (f"cuDNN's ragged (packed) fused attention needs Hopper (sm90) or newer; this GPU "
                f"is sm{capability[0]}{capability[1]}")
    version = frontend().backend_version()
    if version < MIN_CUDNN:
        return (f"needs cuDNN >= 9.6 (ragged softmax stats; 64-bit offsets from 9.5), this "
                f"process loads {version}")
    return None
