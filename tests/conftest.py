import os
import sys

import pytest
import torch

# tests/ holds shared helpers (distributed.py); make them importable from every test module.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed with one CPU process and megatron-core's groups at TP=PP=CP=1."""
    from megatron_prolong.config import Layout
    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    runtime = init_distributed("cpu")
    init_model_parallel(Layout(1, 1, 1, 1, 1, 1), seed=1234)
    return runtime


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster on this machine (scripts/slurm_local.sh), one per session;
    the tests that use it skip with the harness's reason where it cannot run. Its
    configuration, state and daemon logs stay in the session's `slurm0` temporary directory."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable

    try:
        cluster = SlurmCluster.start(str(tmp_path_factory.mktemp("slurm")))
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()
