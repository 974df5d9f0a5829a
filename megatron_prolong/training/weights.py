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
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), directory)


def load_model_weights(model_chunks: list, directory: str, strict: bool = True) -> None:
    state = dist_checkpointing.load(model_sharded_state_dict(model_chunks), directory)
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
