"""The HF transformers peer (tools/bench_hf_peer.py): its document masking, its chunked loss
and its choice of attention, on CPU with a tiny Llama (the GPU kit runs it at 64K)."""
import pytest
import torch

from megatron_prolong.config import load_config
from tool_modules import load_tool


@pytest.fixture(scope="module")
def peer():
    return load_tool("bench_hf_peer")


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def peer_hidden_packed_vs_alone(peer, attention: str, device: str, autocast) -> tuple:
    """(max difference of the final hidden states between the packed row and each document
    run alone, the same with the whole row as one document)."""
    cfg = load_config(None, ["model.preset=tiny", "model.num_layers=2"])
    torch.manual_seed(0)
    model = peer.build_peer(cfg.model, attention, device, torch.float32).eval()
    lengths = [37, 90, 1, 64, 128]
    tokens = torch.randint(0, cfg.model.vocab_size, (1, sum(lengths)),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), autocast():
        packed = peer.row_hidden(model, dict(tokens=tokens, cu_seqlens=_cu(lengths)),
                                 attention, device).float()
        worst, start = 0.0, 0
        for n in lengths:
            alone = peer.row_hidden(model, dict(tokens=tokens[:, start:start + n],
                                                cu_seqlens=_cu([n])), attention, device).float()
            worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
            start += n
        one = peer.row_hidden(model, dict(tokens=tokens, cu_seqlens=_cu([sum(lengths)])),
                              attention, device).float()
    return worst, (one - packed).abs().max().item()


def test_peer_packed_row_equals_documents_run_alone(peer):
    from contextlib import nullcontext

    masked, unmasked = peer_hidden_packed_vs_alone(peer, "sdpa", "cpu", nullcontext)
    assert masked <= 1e-5
    assert unmasked > 1e-3  # the mask (and the position restarts) matter


@pytest.mark.slow
def test_peer_flex_path_masks_documents(peer, monkeypatch):
    """The flex peer's plumbing (our BlockMask through transformers' flex_attention forward),
    run on CPU with transformers' compiled flex call swapped for the eager one (forward only:
    PyTorch has no CPU backward for FlexAttention; the GPU test covers training)."""
    from contextlib import nullcontext

    if not peer._flex_supported():
        pytest.skip("this transformers has no flex_attention for Llama")
    integration = pytest.importorskip("transformers.integrations.flex_attention")
    if not hasattr(integration, "compile_friendly_flex_attention"):
        pytest.skip("transformers' flex integration has another layout")
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(integration, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw))
    masked, unmasked = peer_hidden_packed_vs_alone(peer, "flex", "cpu", nullcontext)
    assert masked <= 1e-5
    assert unmasked > 1e-3


def test_chunked_loss_equals_full_logits_loss(peer):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g)
    weight = torch.randn(100, 32, generator=g) * 0.1
    labels = torch.randint(0, 100, (300,), generator=g)
    mask = (torch.rand(300, generator=g) > 0.2).float()
    results = []
    for chunk in (0, 64):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = peer.chunked_lm_loss(h, w, labels, mask, chunk)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for full, chunked in zip(*results):
        assert torch.allclose(full, chunked, rtol=1e-5, atol=1e-5)


def test_attention_choice(peer):
    assert peer.choose_attention("auto", "cpu", 256) == "sdpa"
    for attention, tokens, needle in (("sdpa", 65536, "too large"), ("flex", 256, "CUDA only"),
                                      ("flash", 256, "CUDA only")):
        with pytest.raises(peer.PeerError, match=needle):
            peer.choose_attention(attention, "cpu", tokens)
    with pytest.raises(peer.PeerError, match="no document-masked attention"):
        peer.choose_attention("auto", "cpu", 65536)


def test_document_positions_restart_at_every_document(peer):
    assert peer.document_positions(_cu([3, 1, 2]), 6).tolist() == [[0, 1, 2, 0, 0, 1]]
