"""Chunked cross-entropy equals the full-logits loss, in values and gradients, also under TP."""
import pytest
import torch

from distributed import run_distributed
from megatron_prolong.model.loss import chunked_cross_entropy, full_logits_cross_entropy


def _inputs(s=97, b=2, h=16, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(vocab, h, generator=g).mul(0.5)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    upstream = torch.rand(b, s, generator=g)  # a mask-like weighting of per-token losses
    return hidden, weight, labels, upstream


def _loss_and_grads(fn, hidden, weight, labels, upstream):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fn(hidden, weight, labels)
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def _max_rel(a, b):
    """Largest difference relative to the reference's scale (per-element ratios of values that
    cancel to ~0 only measure fp32 rounding)."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_full_logits(chunk, fused):
    """The plain chunk loop and the fused one (model.fused_loss: its element-wise kernels run
    uncompiled on CPU, the same formulas torch.compile fuses on CUDA)."""
    args = _inputs()
    want = _loss_and_grads(full_logits_cross_entropy, *args)
    got = _loss_and_grads(lambda h, w, l: chunked_cross_entropy(h, w, l, chunk, fused=fused),
                          *args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert _max_rel(g, w) <= 1e-5


def test_fused_loss_in_bf16_matches_the_plain_loop():
    hidden, weight, labels, upstream = (x.bfloat16() if x.is_floating_point() else x
                                        for x in _inputs(s=64, vocab=96))
    plain, fused = (_loss_and_grads(lambda h, w, l, f=f: chunked_cross_entropy(h, w, l, 24,
                                                                               fused=f),
                                    hidden, weight, labels, upstream) for f in (False, True))
    for p, f in zip(plain, fused):
        assert p.dtype == f.dtype and _max_rel(f.float(), p.float()) <= 1e-2


@pytest.mark.gpu
def test_fused_loss_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hidden, weight, labels, upstream = (x.cuda() for x in _inputs(s=300, vocab=1000))
    want = _loss_and_grads(full_logits_cross_entropy, hidden, weight, labels, upstream)
    got = _loss_and_grads(lambda h, w, l: chunked_cross_entropy(h, w, l, 128, fused=True),
                          hidden, weight, labels, upstream)
    for g, w in zip(got, want):
        assert _max_rel(g, w) <= 1e-4


def test_chunk_size_must_be_positive():
    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="loss_chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, 0)


def _tp2_case():
    """On each of 2 ranks: the vocab-parallel chunked loss against the single-rank reference,
    and a whole tiny model with chunking against megatron's own full-logits loss."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from megatron_prolong.config import Layout, load_config
    from megatron_prolong.model.llama import build_llama
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    init_distributed("cpu")
    init_model_parallel(Layout(2, 2, 1, 1, 1, 1), seed=7)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    hidden, weight, labels, upstream = _inputs(vocab=64)
    ref = _loss_and_grads(full_logits_cross_entropy, hidden, weight, labels, upstream)

    h = hidden.clone().requires_grad_(True)
    w = weight[rank * 32:(rank + 1) * 32].clone().requires_grad_(True)
    loss = chunked_cross_entropy(copy_to_tensor_model_parallel_region(h, group=group), w,
                                 labels, 13, group)
    (loss * upstream).sum().backward()
    out = {"loss": _max_rel(loss.detach(), ref[0]), "hidden_grad": _max_rel(h.grad, ref[1]),
           "weight_grad": _max_rel(w.grad, ref[2][rank * 32:(rank + 1) * 32])}
    # The fused loop (model.fused_loss) makes the same all-reduces.
    h.grad, w.grad = None, None
    loss = chunked_cross_entropy(copy_to_tensor_model_parallel_region(h, group=group), w,
                                 labels, 13, group, fused=True)
    (loss * upstream).sum().backward()
    out["fused"] = [_max_rel(loss.detach(), ref[0]), _max_rel(h.grad, ref[1]),
                    _max_rel(w.grad, ref[2][rank * 32:(rank + 1) * 32])]

    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor=2"])
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (0, 24):
        init_model_parallel(Layout(2, 2, 1, 1, 1, 1), seed=7)  # same initial weights
        model = build_llama(cfg.model, cfg.parallel, on_cpu=True, loss_chunk_size=chunk)
        model_loss = model(tokens, torch.arange(64)[None], None, labels=torch.roll(tokens, -1))
        model_loss.sum().backward()
        results.append((model_loss.detach(), model.output_layer.weight.grad.clone(),
                        model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone()))
    out["model"] = [_max_rel(a, b) for a, b in zip(results[1], results[0])]
    return out


@pytest.mark.slow
def test_chunked_loss_under_tensor_parallelism():
    for rank_result in run_distributed(_tp2_case, 2):
        assert rank_result["loss"] <= 1e-5, rank_result
        assert rank_result["hidden_grad"] <= 1e-5, rank_result
        assert rank_result["weight_grad"] <= 1e-5, rank_result
        assert max(rank_result["model"]) <= 1e-5, rank_result
        assert max(rank_result["fused"]) <= 1e-5, rank_result


def test_masked_token_loss_reports_per_domain_sums():
    from megatron_prolong.training.step import masked_token_loss

    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    domains = torch.tensor([[0, 0, 0, 1, 1, 1]])
    loss_sum, count, report = masked_token_loss(mask, per_token, domain_ids=domains,
                                                num_domains=2)
    assert float(loss_sum) == 12.0 and int(count) == 4  # a sum: divided by the global count later
    assert report["domain loss"].tolist() == [3.0, 9.0, 2.0, 2.0]  # sums per domain, then counts
