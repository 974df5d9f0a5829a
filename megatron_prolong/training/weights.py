"""Model weights as a megatron-core distributed checkpoint, independent of the parallel layout.

Weights saved from any TP/PP layout load into any other: dist_checkpointing stores global
tensors and reshards on load (the SwiGLU fc1 [gate; up] split included).
"""
from __future__ import annotations

import os

from megatron.core import dist_checkpointing


def unwrap(chunk):
    """The GPTModel inside a DDP (or other) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages are not supported yet")
    return unwrap(model_chunks[0]).sharded_state_dict()


def save_model_weights(model_chunks: list, directory: str) -> None:
    """Collective. The weights and their manifest (digests: training/manifest.py)."""
    import torch.distributed as dist

    from megatron_prolong.training import manifest

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), directory)
    if dist.is_initialized():
        dist.barrier()
    parts = manifest.all_gather(manifest.digest_own_files(directory))
    if not dist.is_initialized() or dist.get_rank() == 0:
        manifest.write_manifest(directory, parts)


def load_model_weights(model_chunks: list, directory: str, strict: bool = True) -> None:
    """Collective; every unpickling through the allow-list (training/safe_dcp.py)."""
    from megatron_prolong.training.safe_dcp import load_distributed

    state = load_distributed(model_sharded_state_dict(model_chunks), directory)
    unwrap(model_chunks[0]).load_state_dict(state, strict=strict)


def weights_are_finite(model_chunks: list) -> bool:
    """Collective: True when no rank's parameters hold a NaN or Inf. One reduction per
    tensor (a sum is non-finite exactly when an element is, short of an fp32 overflow that
    weights never reach) and one all-reduce; cheap next to a checkpoint save."""
    import torch
    import torch.distributed as dist

    sums = [p.detach().sum(dtype=torch.float32) for chunk in model_chunks
            for p in chunk.parameters()]
    total = torch.stack(sums).sum() if sums else torch.zeros(())
    bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=total.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
