"""Small tensors for collectives on the default group live where its backend reduces them:
CUDA under NCCL (multi-GPU runs: the metrics' FLOP/token counts, the preemption flag), CPU under
gloo (CPU runs and tests). A CPU tensor handed to NCCL fails at the first multi-GPU step."""
import torch
import torch.distributed as dist

from megatron_prolong.training import metrics, parallel, preemption


def _backend(monkeypatch, name):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)


def test_collective_device_follows_the_backend(monkeypatch):
    _backend(monkeypatch, "nccl")
    assert parallel.collective_device() == torch.device("cuda", 3)
    _backend(monkeypatch, "gloo")
    assert parallel.collective_device() == torch.device("cpu")


def test_metrics_and_preemption_reduce_on_the_collective_device(monkeypatch):
    """Both put their tensor where collective_device says (a CPU tensor would be handed to
    NCCL otherwise)."""
    from megatron_prolong.config import load_config, validate
    from megatron_prolong.training.step import StepResult

    asked = []

    def device():
        asked.append(True)
        return torch.device("cpu")

    monkeypatch.setattr(parallel, "collective_device", device)
    monkeypatch.setattr(metrics, "collective_device", device)
    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduced.append(t))

    assert preemption.PreemptionFlag().any_rank() is False
    assert len(asked) == len(reduced) == 1

    cfg = load_config(None, ["model.preset=tiny", "training.seq_length=64",
                             "logging.tensorboard=false"])
    logger = metrics.MetricsLogger(cfg, validate(cfg, 2), 10, [], rank=1)
    batch = {"tokens": torch.zeros(1, 64, dtype=torch.long),
             "cu_seqlens": torch.tensor([0, 40, 64], dtype=torch.int32)}
    logger.step_done(1, StepResult(2.0, 64, 1.0, False), 1e-3, 0.1, [batch], 0)
    assert len(asked) == len(reduced) == 2


def _demo_corpus_fails_on_rank_0(run_dir):
    import os

    from megatron_prolong.config import load_config
    from megatron_prolong.data import demo_corpus
    from megatron_prolong.training import data_source

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    demo_corpus.build_demo_corpus = full_disk
    cfg = load_config(None, [f"run_dir={run_dir}", "data.kind=demo"])
    try:
        data_source._build_demo(cfg, rank)
    except Exception as exc:  # noqa: BLE001 - the test wants each rank's error
        return rank, type(exc).__name__, str(exc)
    return rank, None, os.listdir(run_dir)


def test_demo_corpus_failure_on_rank_0_ends_every_rank(tmp_path):
    """Rank 0 builds the demo corpus while the others wait: its failure ends them too, at once,
    rather than after the process group's timeout in the broadcast."""
    from distributed import run_distributed

    results = run_distributed(_demo_corpus_fails_on_rank_0, 2, str(tmp_path), timeout=600)
    assert results[0][:2] == (0, "OSError") and "No space left" in results[0][2]
    assert results[1][:2] == (1, "RuntimeError")
    assert "rank 0 failed at start-up" in results[1][2] and "No space left" in results[1][2]
