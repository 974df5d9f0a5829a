"""Random initialisation that does not depend on the parallel layout.

megatron-core initialises each rank's shard on its own. On GPU every tensor-parallel rank draws
its slice from its own RNG stream; with `use_cpu_initialization` (the full master weight, then
this rank's slice) TP no longer matters, but a pipeline stage still draws its first layer from a
fresh stream instead of the stream the earlier stages' layers consumed. So the same recipe
started from different models at TP1 and TP2 x PP2, and gave different losses.

Here every weight matrix is drawn as the FULL tensor of its checkpoint key, from a generator
seeded by (seed, key, global layer number), and each rank keeps its slice. Keys, global shapes
and slices come from the model's own `sharded_state_dict()`: the mapping megatron-core's
dist_checkpointing uses to reshard checkpoints between layouts (the fc1 gate/up split included),
so the model is the same tensor-for-tensor under every TP/PP/CP/DP layout, with the TE or the
local layer spec. Cost: each rank draws the full tensors of its own pipeline stage (TP times its
own share), one tensor at a time, on the parameters' device, after megatron's own draw.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer import TransformerConfig

# Projections back into the residual stream get megatron's scaled init (std / sqrt(2 L)),
# as megatron-core's own layers do; the embedding its embedding init; the rest init_method.
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _sharded_tensors(sharded: object) -> Iterator[ShardedTensor]:
    """Every ShardedTensor of a (nested) sharded state dict; factories built into theirs."""
    if isinstance(sharded, dict):
        for value in sharded.values():
            yield from _sharded_tensors(value)
    elif isinstance(sharded, (list, tuple)):
        for value in sharded:
            yield from _sharded_tensors(value)
    elif isinstance(sharded, ShardedTensorFactory):
        # fc1 under SwiGLU: the build splits the local [gate_r; up_r] into two views, each at its
        # offset in the global [gate; up] tensor.
        yield from _sharded_tensors(sharded.build())
    elif isinstance(sharded, ShardedTensor):
        yield sharded


def _init_method_for(key: str, config: TransformerConfig) -> Callable:
    if key.endswith(_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    if key.endswith("word_embeddings.weight"):
        return config.embedding_init_method
    return config.init_method


def tensor_seed(seed: int, key: str, layer_offsets: tuple) -> int:
    """A 63-bit seed that is a pure function of the run seed, the checkpoint key and the
    position on the stacked (layer) axes: independent of the order modules are built in."""
    digest = hashlib.sha256(f"{seed}|{key}|{layer_offsets}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def initialize_layout_free(model: torch.nn.Module, config: TransformerConfig, seed: int) -> None:
    """Overwrite every weight matrix of `model` (this rank's chunk) with its slice of the full
    tensor drawn from (seed, key); 1-D parameters (norm weights, ones) are left as built."""
    wanted = {id(p): name for name, p in model.named_parameters() if p.dim() >= 2}
    by_storage = {p.untyped_storage().data_ptr(): id(p)
                  for p in model.parameters() if id(p) in wanted}
    drawn: dict[tuple, torch.Tensor] = {}  # fc1's gate and up views share one full tensor
    done = set()
    for sh in _sharded_tensors(model.sharded_state_dict()):
        local = sh.data
        owner = by_storage.get(local.untyped_storage().data_ptr())
        if owner is None or local.dim() < 2:
            continue
        if sh.flattened_range is not None:
            raise RuntimeError(f"{sh.key}: flattened shards are not expected before DDP wrapping")
        p = sh.prepend_axis_num
        layer_offsets = tuple(sh.global_offset[:p])  # the global layer number on stacked keys
        full_shape = sh.global_shape[p:]
        cache_key = (sh.key, layer_offsets)
        full = drawn.get(cache_key)
        if full is None:
            generator = torch.Generator(device=local.device)
            generator.manual_seed(tensor_seed(seed, sh.key, layer_offsets))
            full = torch.empty(full_shape, dtype=torch.float32, device=local.device)
            # megatron's init methods are functools.partial(torch.nn.init.normal_, ...).
            _init_method_for(sh.key, config)(full, generator=generator)
            drawn = {cache_key: full}  # keep only the tensor whose other half may follow
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], local.shape))
        local.copy_(full[index].to(local.dtype))
        done.add(owner)
    missing = [name for pid, name in wanted.items() if pid not in done]
    if missing:
        raise RuntimeError(f"layout-free initialisation found no checkpoint key for {missing}")
