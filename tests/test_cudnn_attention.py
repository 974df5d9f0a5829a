"""The cuDNN packed-row kernel's glue (model/cudnn_attention.py) against the recorded contract
of cuDNN's graph API (tests/cudnn_contract.py): the fake reads and writes memory as cuDNN does
(ragged offsets in elements) and computes causal attention per document, so these tests check
the offsets, shapes, dtypes and layouts numerically, forward and backward, on CPU. The kernel
itself is checked on a GPU by the kit's `kernels` stage and `pytest -m gpu`."""
import pytest
import torch

from megatron_prolong.model import attention, cudnn_attention
from megatron_prolong.model.attention import attention_per_document
from megatron_prolong.model.cudnn_attention import (OFF_KV, OFF_Q, OFF_STATS, SEQ_LEN, RowShape,
                                                    cudnn_document_attention, document_batch,
                                                    ragged_arguments)
import cudnn_contract


@pytest.fixture
def fake_cudnn(monkeypatch):
    monkeypatch.setattr(cudnn_attention, "frontend", lambda: cudnn_contract)
    monkeypatch.setattr(cudnn_attention, "graphs", cudnn_attention._Graphs())
    monkeypatch.setattr(cudnn_contract.Graph, "built", [])
    return cudnn_contract


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(total, heads, groups, dim, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(total, n, dim, generator=g).to(dtype)  # noqa: E731
    return make(heads), make(groups), make(groups)


def _fwd_bwd(fn, q, k, v, grad):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


# (document lengths, heads, groups, the longest document as PackedSeqParams gives it): GQA with
# several documents, one document, a zero-length and a one-token document, MHA, MQA, five
# documents (a batch of 8 with three empty ones), max_seqlen unknown (S = the row).
CASES = [([37, 90, 1, 64], 8, 2, 90), ([128], 4, 4, 128), ([5, 0, 70, 1], 8, 1, 70),
         ([20, 30, 3, 3, 8], 4, 2, None)]


@pytest.mark.parametrize("lengths,heads,groups,max_seqlen", CASES)
def test_packed_row_equals_per_document_attention(fake_cudnn, lengths, heads, groups,
                                                  max_seqlen):
    total = sum(lengths)
    q, k, v = _qkv(total, heads, groups, 16, seed=len(lengths), dtype=torch.bfloat16)
    grad = torch.randn(total, heads, 16, generator=torch.Generator().manual_seed(9))
    cu = _cu(lengths)
    ref = _fwd_bwd(lambda a, b, c: attention_per_document(a, b, c, cu, 0.25),
                   q.float(), k.float(), v.float(), grad)
    got = _fwd_bwd(lambda a, b, c: cudnn_document_attention(a, b, c, cu, 0.25, max_seqlen),
                   q, k, v, grad.to(torch.bfloat16))
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape, name
        assert ((g.float() - r).norm() / r.norm()).item() < 1e-2, name


def test_offsets_count_elements_and_widen_to_int64_at_512k():
    bounds = document_batch(_cu([3, 5, 2]))  # three documents and an empty one: B = 4
    assert bounds.tolist() == [0, 3, 8, 10, 10]
    shape = RowShape(total=10, batch=4, longest=8, heads=8, groups=2, head_dim=16,
                     dtype=torch.bfloat16, scale=0.25)
    args = ragged_arguments(bounds, shape)
    assert args[SEQ_LEN].dtype == torch.int32 and args[SEQ_LEN].shape == (4, 1, 1, 1)
    assert args[SEQ_LEN].flatten().tolist() == [3, 5, 2, 0]
    assert args[OFF_Q].shape == (5, 1, 1, 1) and args[OFF_Q].dtype == torch.int32
    assert args[OFF_Q].flatten().tolist() == [0, 3 * 128, 8 * 128, 10 * 128, 10 * 128]
    assert args[OFF_KV].flatten().tolist()[1] == 3 * 32
    assert args[OFF_STATS].flatten().tolist()[1] == 3 * 8
    # A 512K row with 32 heads of 128: the last offset is 2**31, past int32.
    big = RowShape(total=2**19, batch=1, longest=2**19, heads=32, groups=8, head_dim=128,
                   dtype=torch.bfloat16, scale=0.1)
    off = ragged_arguments(document_batch(_cu([2**19])), big)[OFF_Q]
    assert off.dtype == torch.int64 and off.flatten().tolist()[1] == 2**31


def test_graphs_are_reused_across_rows_and_nothing_is_read_on_the_host(fake_cudnn):
    """Rows with different document layouts but the same length, document count bucket and
    longest-document bucket reuse the forward and backward graphs; neither the forward nor the
    backward reads a tensor value on the host (a CUDA synchronisation)."""
    for lengths in ([40, 20, 4], [10, 50, 4], [1, 2, 61]):  # 3 documents (4), longest 33-64 (64)
        q, k, v = _qkv(64, 4, 2, 16, seed=1, dtype=torch.float16)
        q.requires_grad_(True)
        cu = _cu(lengths)
        with fake_cudnn.record_host_reads as reads:
            cudnn_document_attention(q, k, v, cu, 0.25, max(lengths)).sum().backward()
        assert reads.reads == [], reads.reads
    assert len(cudnn_attention.graphs) == 2 and len(fake_cudnn.Graph.built) == 2
    q, k, v = _qkv(64, 4, 2, 16, seed=1, dtype=torch.float16)
    cudnn_document_attention(q, k, v, _cu([1] * 64), 0.25, 1)  # 64 documents of 1: new buckets
    assert len(cudnn_attention.graphs) == 3


def test_kernel_is_chosen_only_where_it_can_run(monkeypatch, fake_cudnn):
    attention.resolve_kernel.cache_clear()
    try:
        monkeypatch.setattr(cudnn_attention, "device_capability", lambda: (9, 0))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert attention.kernel_unavailable("cudnn", "cuda", torch.bfloat16) is None
        # Runnable, but not a default until the kit has checked it on a GPU (AUTO_ORDER).
        assert attention.resolve_kernel("auto", "cuda", torch.bfloat16) != "cudnn"
        assert attention.resolve_kernel("cudnn", "cuda", torch.bfloat16) == "cudnn"
        assert "CUDA in bf16/fp16" in attention.kernel_unavailable("cudnn", "cuda", torch.float32)
        monkeypatch.setattr(fake_cudnn.backend_version, "value", 90500)
        assert "cuDNN >= 9.6" in attention.kernel_unavailable("cudnn", "cuda", torch.bfloat16)
        monkeypatch.setattr(fake_cudnn.backend_version, "value", 91300)
        monkeypatch.setattr(cudnn_attention, "device_capability", lambda: (8, 0))
        assert "Hopper (sm90)" in attention.kernel_unavailable("cudnn", "cuda", torch.bfloat16)
        assert attention.resolve_kernel("auto", "cuda", torch.bfloat16) != "cudnn"
        monkeypatch.setattr(cudnn_attention, "frontend", lambda: None)
        assert "nvidia-cudnn-frontend" in attention.kernel_unavailable("cudnn", "cuda",
                                                                       torch.bfloat16)
    finally:
        attention.resolve_kernel.cache_clear()
