"""Process groups, created once per run: torch.distributed, then megatron-core's parallel_state."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_prolong.config import Layout


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_cpu: bool


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no GPU is visible; use training.device=cpu")
    return requested


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> Runtime:
    """Join the job torchrun/srun started (env:// rendezvous), or start a one-process one."""
    device = resolve_device(device)
    on_cpu = device == "cpu"
    if on_cpu:
        from megatron_prolong.cpu_compat import enable_cpu_execution

        enable_cpu_execution()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        kwargs = {}
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process needs no rendezvous: an in-memory store avoids racing other
            # processes on this machine for a TCP port.
            kwargs["store"] = dist.HashStore()
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev, on_cpu)


def collective_device() -> torch.device:
    """Where a small tensor (a flag, a counter) must live for a collective on the default
    group: NCCL reduces only CUDA tensors, gloo only CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_model_parallel(layout: Layout, seed: int) -> None:
    """megatron-core's tensor/pipeline/context/data groups, then its per-group RNG streams."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        hierarchical_context_parallel_sizes=layout.cp_hierarchy,  # TE a2a+p2p only
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
