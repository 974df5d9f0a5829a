"""Context parallelism on GPUs: Transformer Engine's CP (every comm type) and the Ulysses path on
CUDA kernels, each against no context parallelism (bf16, so tolerances are bf16-sized).

Skipped without CUDA (conftest), and below without Transformer Engine or enough GPUs.
"""
import pytest
import torch

from distributed import run_distributed
from test_context_parallel_equivalence import OVERRIDES, compare_layouts, train_under_layouts

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

BF16 = [o for o in OVERRIDES if not o.startswith("training.precision")] + [
    "training.precision=bf16", "training.device=cuda"]


def _need(gpus: int, te: bool):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    if te:
        pytest.importorskip("transformer_engine.pytorch")


def test_partition_matches_transformer_engine():
    """Our split is TE's thd_get_partitioned_indices (what megatron's get_batch_on_this_cp_rank
    uses), so TE's CP kernels and our batches agree on who holds which token."""
    _need(1, te=True)
    tex = pytest.importorskip("transformer_engine_torch")
    from megatron_prolong.model.context_parallel import cp_partition_indices

    cu = torch.tensor([0, 16, 48, 56, 120], dtype=torch.int32, device="cuda")
    for cp in (2, 4):
        for rank in range(cp):
            want = tex.thd_get_partitioned_indices(cu, int(cu[-1]), cp, rank)
            assert cp_partition_indices(cu, cp, rank).tolist() == want.tolist(), (cp, rank)


TE = ("model.attention_backend=te",)
TE_LAYOUTS_2GPU = [TE] + [TE + ("parallel.context=2", f"parallel.cp_comm_type={c}")
                          for c in ("p2p", "a2a", "allgather")]
LOCAL = ("model.attention_backend=local",)
LOCAL_LAYOUTS_2GPU = [LOCAL, LOCAL + ("parallel.context=2",)]
TE_LAYOUTS_4GPU = [TE, TE + ("parallel.context=2", "parallel.tensor=2",
                             "parallel.sequence_parallel=true", "parallel.cp_comm_type=p2p")]


@pytest.mark.parametrize("gpus,te,layouts", [
    (2, True, TE_LAYOUTS_2GPU),
    (2, False, LOCAL_LAYOUTS_2GPU),
    (4, True, TE_LAYOUTS_4GPU),
], ids=["te-comm-types", "ulysses-cuda", "te-cp-tp-sp"])
def test_gpu_context_parallel_equals_no_parallelism(tmp_path, gpus, te, layouts):
    _need(gpus, te)
    per_rank = run_distributed(train_under_layouts, gpus, layouts, BF16, str(tmp_path / "w"),
                               "cuda", False)
    compare_layouts(per_rank, layouts, loss_rtol=2e-2, grad_rtol=5e-2)
