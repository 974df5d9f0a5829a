import pytest

from distributed import run_distributed
from parallel_cases import losses_across_layouts

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.slow
def test_same_losses_for_every_tp_pp_layout(tmp_path):
    overrides = ["model.preset=tiny", "training.seq_length=128", "training.global_batch_size=4",
                 "optimizer.lr=3e-3", "training.precision=fp32"]
    results = run_distributed(losses_across_layouts, 4, LAYOUTS, 3, overrides, str(tmp_path / "w"))
    reference = results[0][(1, 1)]
    assert reference[0] > reference[-1], "the loss should fall on repeated steps"
    for rank_result in results:
        for layout, losses in rank_result.items():
            assert len(losses) == 3
            for step, (got, want) in enumerate(zip(losses, reference)):
                assert abs(got - want) / abs(want) <= 1e-5, (layout, step, got, want)
