"""Attention never crosses a document boundary: a packed row's per-token losses equal those of
each document run alone."""
import pytest
import torch

from megatron_prolong.config import load_config
from megatron_prolong.model.attention import varlen_causal_attention
from megatron_prolong.model.context_parallel import packed_seq_params
from megatron_prolong.model.llama import build_llama

DOC_LENGTHS = [37, 90, 1, 64, 128]


def _dense_reference(q, k, v, lengths, scale):
    """Block-diagonal causal attention with an explicit [t, t] mask (tiny sizes only)."""
    t, heads = q.shape[0], q.shape[1]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    allowed = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _check_kernel(device, dtype, atol):
    g = torch.Generator().manual_seed(0)
    t = sum(DOC_LENGTHS)
    q = torch.randn(t, 8, 16, generator=g)
    k, v = torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    want = _dense_reference(q, k, v, DOC_LENGTHS, 0.25)
    got = varlen_causal_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                                  _cu(DOC_LENGTHS), max(DOC_LENGTHS), 0.25)
    assert got.shape == want.shape
    assert (got.float().cpu() - want).abs().max().item() <= atol


def test_varlen_kernel_matches_dense_block_diagonal_mask_cpu():
    _check_kernel("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_varlen_kernel_matches_dense_block_diagonal_mask_cuda(dtype, atol):
    _check_kernel("cuda", dtype, atol)


def _per_token_losses(model, tokens, labels, lengths):
    batch = dict(tokens=tokens, labels=labels, cu_seqlens=_cu(lengths))
    pos = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        return model(tokens, pos, None, labels=labels,
                     packed_seq_params=packed_seq_params(batch, tokens.device))[0]


@pytest.fixture(scope="module")
def tiny_model(megatron_single_process):
    cfg = load_config(None, ["model.preset=tiny"])
    torch.manual_seed(0)
    return build_llama(cfg.model, cfg.parallel, on_cpu=True, use_te=False).eval(), cfg


def test_packed_losses_equal_documents_run_alone(tiny_model):
    model, cfg = tiny_model
    g = torch.Generator().manual_seed(1)
    t = sum(DOC_LENGTHS)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g)
    packed = _per_token_losses(model, tokens, labels, DOC_LENGTHS)
    start = 0
    worst = 0.0
    for n in DOC_LENGTHS:
        alone = _per_token_losses(model, tokens[:, start:start + n], labels[:, start:start + n], [n])
        worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
        start += n
    assert worst <= 1e-5

    # The same row as one document: later documents now see earlier ones, so losses differ.
    unmasked = _per_token_losses(model, tokens, labels, [t])
    assert (unmasked[DOC_LENGTHS[0]:] - packed[DOC_LENGTHS[0]:]).abs().max().item() > 1e-3


@pytest.mark.gpu
def test_packed_losses_equal_documents_alone_on_transformer_engine():
    """The TE spec with THD packed sequences (needs TE on CUDA). TE's fused THD kernels run in
    bf16 only, so the bar is bf16 rounding rather than the CPU path's 1e-5."""
    pytest.importorskip("transformer_engine")
    from megatron_prolong.config import Layout
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    init_distributed("cuda")
    init_model_parallel(Layout(1, 1, 1, 1, 1, 1), seed=1234)
    cfg = load_config(None, ["model.preset=tiny", "model.attention_backend=te"])
    model = build_llama(cfg.model, cfg.parallel, precision="bf16", use_te=True).cuda().eval()
    g = torch.Generator().manual_seed(1)
    lengths = [64, 128, 32, 32]  # TE THD kernels want multiples of 16
    t = sum(lengths)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g).cuda()
    labels = torch.randint(0, cfg.model.vocab_size, (1, t), generator=g).cuda()
    packed = _per_token_losses(model, tokens, labels, lengths)
    start = 0
    for n in lengths:
        alone = _per_token_losses(model, tokens[:, start:start + n], labels[:, start:start + n], [n])
        assert (packed[start:start + n] - alone).float().abs().max().item() <= 2e-2
        start += n
