"""SFT's token-scaled loss: the gradient is that of (sum of losses over every loss token of the
global batch) / (their count), not a mean of per-micro-batch means."""
import torch

from megatron_prolong.config import Layout, load_config
from megatron_prolong.model.context_parallel import packed_seq_params
from megatron_prolong.training.step import setup_training, train_step
from megatron_prolong.training.weights import unwrap
from parallel_cases import synthetic_packed_rows


def test_gradients_are_token_scaled_over_the_global_batch(megatron_single_process):
    cfg = load_config(None, ["model.preset=tiny", "training.seq_length=64",
                             "training.global_batch_size=2", "optimizer.clip_grad=0",
                             "optimizer.weight_decay=0"])
    layout = Layout(1, 1, 1, 1, 1, 2)
    state = setup_training(cfg, megatron_single_process, layout)
    rows = synthetic_packed_rows(2, 64, cfg.model.vocab_size, seed=7)
    rows[0]["loss_mask"][:, 8:] = 0  # an SFT row with few assistant tokens next to a full one
    model = unwrap(state.model[0])
    params = [p for p in model.parameters() if p.requires_grad]

    sums, counts = [], []
    for row in rows:
        pos = torch.arange(64)[None]
        losses = model(row["tokens"], pos, None, labels=row["labels"],
                       packed_seq_params=packed_seq_params(row, "cpu"))
        sums.append((losses * row["loss_mask"]).sum())
        counts.append(row["loss_mask"].sum())
    token_scaled = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 2
    assert abs(token_scaled.item() - mean_of_means.item()) > 1e-3  # the two objectives differ
    want = torch.autograd.grad(token_scaled, params)

    result = train_step(state, rows, lr=0.0)
    assert abs(result.loss - token_scaled.item()) <= 1e-6 * abs(token_scaled.item())
    assert result.loss_tokens == int(sum(counts).item())
    for p, g in zip(params, want):
        assert torch.allclose(p.main_grad, g, rtol=1e-5, atol=1e-7), "gradient is not token-scaled"
