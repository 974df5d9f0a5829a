"""A CPU stand-in for nvidia-cudnn-frontend's graph API that holds the callers to its contract.

It accepts exactly the calls megatron_prolong/model/cudnn_attention.py makes (the subset of
`cudnn.pygraph` that nvidia-cudnn-frontend 1.26.0's own PyTorch op uses), asserts what cuDNN
requires of them, and executes a graph the way cuDNN reads memory: element (b, h, s, d) of a
ragged tensor sits at `offset[b] + h * stride[1] + s * stride[2] + d * stride[3]` of the tensor's
buffer, ragged offsets counted in ELEMENTS, for s < seq_len[b] only. Inside each document it
computes causal attention in fp32 with PyTorch (the reference), so the glue's output and
gradients are checked numerically: an offset in tokens instead of elements, a wrong stride or
a misplaced stats tensor reads other memory and fails the comparison.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

data_type = SimpleNamespace(HALF="HALF", BFLOAT16="BFLOAT16", FLOAT="FLOAT", INT32="INT32",
                            INT64="INT64")
TORCH_OF = {"HALF": torch.float16, "BFLOAT16": torch.bfloat16, "FLOAT": torch.float32,
            "INT32": torch.int32, "INT64": torch.int64}
heur_mode = SimpleNamespace(A="A", FALLBACK="FALLBACK")
diagonal_alignment = SimpleNamespace(TOP_LEFT="TOP_LEFT", BOTTOM_RIGHT="BOTTOM_RIGHT")


class _Tensor:
    def __init__(self, name, dim=None, stride=None, data_type=None, uid=None):
        self.name, self.dim, self.stride, self.data_type, self.uid = (name, dim, stride,
                                                                      data_type, uid)
        self.ragged, self.output = None, False

    def set_ragged_offset(self, t):
        assert t.dim == [self.dim[0] + 1, 1, 1, 1], (self.name, t.dim, self.dim)
        assert t.data_type in ("INT32", "INT64"), t.data_type
        self.ragged = t
        return self

    def set_uid(self, uid):
        self.uid = uid
        return self

    def set_output(self, flag):
        self.output = flag
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dt):
        self.data_type = dt
        return self


class Graph:
    built: list = []  # every graph built, for the tests

    def __init__(self, io_data_type, intermediate_data_type, compute_data_type, handle):
        assert intermediate_data_type == compute_data_type == "FLOAT"
        self.io, self.tensors, self.op, self.finished = io_data_type, [], None, []

    def tensor(self, name, dim, stride, data_type, uid):
        assert uid not in {t.uid for t in self.tensors}, f"uid {uid} used twice"
        t = _Tensor(name, list(dim), list(stride), data_type, uid)
        self.tensors.append(t)
        return t

    def _check_mask(self, kw):
        assert kw["use_padding_mask"] is True and kw["seq_len_q"] is kw["seq_len_kv"]
        seq = kw["seq_len_q"]
        assert seq.data_type == "INT32" and seq.dim[1:] == [1, 1, 1], seq.dim
        assert kw["diagonal_alignment"] == "TOP_LEFT" and kw["diagonal_band_right_bound"] == 0
        assert kw.get("diagonal_band_left_bound") is None  # no sliding window
        assert isinstance(kw["attn_scale"], float)

    def sdpa(self, name, q, k, v, generate_stats, compute_data_type, **kw):
        assert generate_stats is True and compute_data_type == "FLOAT"
        self._check_mask(kw)
        o, stats = _Tensor("o"), _Tensor("stats")
        self.tensors += [o, stats]
        self.op = dict(kind="forward", q=q, k=k, v=v, o=o, stats=stats, **kw)
        return o, stats

    def sdpa_backward(self, name, q, k, v, o, dO, stats, max_total_seq_len_q,
                      max_total_seq_len_kv, **kw):
        self._check_mask(kw)
        assert isinstance(max_total_seq_len_q, int) and max_total_seq_len_q % 64 == 0
        grads = [_Tensor(n) for n in ("dq", "dk", "dv")]
        self.tensors += grads
        self.op = dict(kind="backward", q=q, k=k, v=v, o=o, dO=dO, stats=stats, dq=grads[0],
                       dk=grads[1], dv=grads[2], max_total=max_total_seq_len_q, **kw)
        return grads

    def validate(self):
        op = self.op
        for key in ("q", "k", "v", "o", "stats", "dO", "dq", "dk", "dv"):
            t = op.get(key)
            if t is None:
                continue
            assert t.uid is not None and t.dim and t.stride, key
            assert t.ragged is not None, f"{key}: packed rows need a ragged offset"
            assert t.data_type == ("FLOAT" if key == "stats" else self.io), (key, t.data_type)
        q, k = op["q"], op["k"]
        assert q.dim[0] == k.dim[0] and q.dim[2] == k.dim[2] and q.dim[3] == k.dim[3]
        assert q.dim[1] % k.dim[1] == 0, "grouped K/V: heads must be a multiple of groups"
        self.finished.append("validate")

    def build_operation_graph(self):
        self.finished.append("build_operation_graph")

    def create_execution_plans(self, modes):
        assert modes
        self.finished.append("create_execution_plans")

    def check_support(self):
        self.finished.append("check_support")

    def build_plans(self):
        assert self.finished == ["validate", "build_operation_graph", "create_execution_plans",
                                 "check_support"], self.finished
        Graph.built.append(self)

    def get_workspace_size(self):
        return 16

    # --- execution: read and write memory as cuDNN does ---------------------------------
    def _view(self, pack, t, b, length):
        buf = pack[t.uid]
        assert buf.is_contiguous(), t.name
        assert buf.dtype == TORCH_OF[t.data_type], (t.name, buf.dtype, t.data_type)
        offsets = pack[t.ragged.uid]
        assert offsets.dtype == TORCH_OF[t.ragged.data_type] and list(offsets.shape) == t.ragged.dim
        start = int(offsets.reshape(-1)[b])
        n, d = t.dim[1], t.dim[3]
        last = start + (n - 1) * t.stride[1] + (length - 1) * t.stride[2] + (d - 1) * t.stride[3]
        assert 0 <= start and last < buf.numel(), f"{t.name}: document {b} reads past its buffer"
        return buf.reshape(-1).as_strided((n, length, d), (t.stride[1], t.stride[2], t.stride[3]),
                                          buf.storage_offset() + start)

    def execute(self, pack, workspace, handle):
        assert workspace.numel() >= 16 and workspace.dtype == torch.uint8
        op = self.op
        seq = pack[op["seq_len_q"].uid]
        assert seq.dtype == torch.int32 and list(seq.shape) == op["seq_len_q"].dim
        heads, groups = op["q"].dim[1], op["k"].dim[1]
        with record_host_reads.paused(), torch.enable_grad():  # autograd's backward disables it
            assert op["q"].dim[2] >= int(seq.max()), "S must bound every document"
            for b, length in enumerate(seq.reshape(-1).tolist()):
                if length == 0:
                    continue
                q, k, v = (self._view(pack, op[n], b, length).detach().float()
                           for n in ("q", "k", "v"))
                rep = heads // groups
                kx, vx = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
                scale = op["attn_scale"]
                if op["kind"] == "forward":
                    out = F.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)
                    self._view(pack, op["o"], b, length).copy_(out)
                    lse = _logsumexp(q, kx, scale)[..., None]
                    self._view(pack, op["stats"], b, length).copy_(lse)
                    continue
                stats = self._view(pack, op["stats"], b, length)[..., 0]
                torch.testing.assert_close(stats, _logsumexp(q, kx, scale), rtol=1e-3, atol=1e-3)
                q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
                kx, vx = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
                out = F.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)
                out.backward(self._view(pack, op["dO"], b, length).float())
                for name, src in (("dq", q), ("dk", k), ("dv", v)):
                    self._view(pack, op[name], b, length).copy_(src.grad)


def _logsumexp(q, k, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).logsumexp(-1)


class _RecordHostReads:
    """Records reads of tensor values by the host (.item(), .tolist(), int(t), bool(t), ...)
    outside the fake's own arithmetic: the synchronisations a CUDA stream would wait for. It
    patches the Tensor methods themselves, so autograd's backward (another thread on CUDA) is
    covered too."""

    NAMES = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")

    def __init__(self):
        self.reads, self._paused, self._saved = [], False, {}

    def __enter__(self):
        self.reads = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                if not self._paused:
                    self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    @contextlib.contextmanager
    def paused(self):
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was


record_host_reads = _RecordHostReads()


def backend_version():
    return backend_version.value


backend_version.value = 91300  # the cuDNN a test pretends to load


def create_handle():
    return object()


def set_stream(handle, stream):
    assert stream == 0  # CPU tests: no CUDA stream


pygraph = Graph
