"""The same recipe starts from the same model under every TP/PP layout (model/initialization.py)."""
import pytest

from distributed import run_distributed
from parallel_cases import fresh_model_across_layouts

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # 2 processes: TP and PP each on their own
OVERRIDES = ["model.preset=tiny", "training.seq_length=128", "training.global_batch_size=4",
             "training.precision=fp32", "training.seed=7"]


@pytest.mark.slow
def test_random_init_and_step_one_loss_are_the_same_under_every_layout(tmp_path):
    results = run_distributed(fresh_model_across_layouts, 2, LAYOUTS, OVERRIDES,
                              str(tmp_path / "w"))
    losses, differences, stds = results[0]
    # The weights really are random (megatron's N(0, 0.02); scaled for the output projections).
    assert 0.018 < stds["embedding.word_embeddings.weight"] < 0.022
    assert 0.018 < stds["decoder.layers.0.mlp.linear_fc1.weight"] < 0.022
    assert stds["decoder.layers.3.mlp.linear_fc2.weight"] < 0.012
    for layout, diff in differences.items():
        # Gathered to full tensors, every layout's fresh model IS the (1, 1) model: bit-equal.
        assert max(diff.values()) == 0.0, (layout, {k: d for k, d in diff.items() if d})
    reference = losses[(1, 1)]
    for rank_losses, _, _ in results:
        for layout, (loss, grad_norm) in rank_losses.items():
            # Only the order of floating-point sums differs between layouts. The gradient norm
            # also needs the parameters' tensor-parallel marks that megatron's init sets.
            assert abs(loss - reference[0]) / reference[0] <= 1e-5, (layout, loss, reference)
            assert abs(grad_norm - reference[1]) / reference[1] <= 1e-5, (layout, grad_norm,
                                                                          reference)
