"""megatron-core distributed checkpoints (torch_dist): writing one from full tensors, reading
regions of one back.

Writing goes through a real GPTModel (TP=1, PP=1, one CPU process) built on the meta device: the
converted tensors become its parameters without a copy, and training/weights.save_model_weights
writes them, so the checkpoint has exactly the keys, factories (SwiGLU fc1) and extra-state
objects that load_model_weights expects at any TP/PP/CP layout.

Reading uses torch.distributed.checkpoint directly with a planner that asks for one region (one
layer of one tensor) at a time: no process group, no model, and only that region in memory,
whatever layout the checkpoint was saved in (dist_checkpointing's own loader needs every
fragment of a tensor requested at once on a single process).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_prolong.config import Layout, ModelConfig, ParallelConfig
from megatron_prolong.convert.errors import ConversionError


def check_checkpoint_dir(directory: str) -> None:
    meta = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta):
        raise ConversionError(f"{directory}: no metadata.json; not a megatron-core distributed "
                              "checkpoint (point at the directory save_model_weights wrote)")
    with open(meta) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{directory}: sharded_backend={backend!r}; only torch_dist "
                              "checkpoints are supported")
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise ConversionError(f"{directory}: .metadata is missing; the save did not finish")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def single_process_model_parallel() -> None:
    """A one-process gloo group with TP=1/PP=1 (the converter's own, on the CPU)."""
    import torch.distributed as dist

    from megatron_prolong.training.parallel import init_distributed, init_model_parallel

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError("hf-to-mcore runs as one process; do not launch it with torchrun")
    init_distributed("cpu")
    init_model_parallel(Layout(1, 1, 1, 1, 1, 1), seed=0)


def save_mcore_checkpoint(state: dict[str, torch.Tensor], model: ModelConfig, directory: str) -> None:
    """Write `state` (local-spec parameter names -> full tensors) as a distributed checkpoint."""
    from megatron_prolong.model.llama import build_llama
    from megatron_prolong.training.weights import save_model_weights

    single_process_model_parallel()
    with torch.device("meta"):  # no allocation, no random init: the parameters come from `state`
        gpt = build_llama(model, ParallelConfig(), on_cpu=True, use_te=False)
    result = gpt.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"internal mapping error: missing {missing}, unexpected "
                              f"{result.unexpected_keys}")
    save_model_weights([gpt], directory)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def tensor_metadata(directory: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in the checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_checkpoint_dir(directory)
    md = FileSystemReader(directory).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _region_planner(requests: list[tuple[str, tuple[int, ...], torch.Tensor]]):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionLoadPlanner(DefaultLoadPlanner):
        """Reads the given regions of global tensors into the given buffers."""

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata, self.is_coordinator = metadata, is_coordinator
            self.buffers = {}

        def create_local_plan(self):
            items = []
            for key, offsets, buf in requests:
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
                self.buffers[(key, tuple(offsets))] = buf
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.buffers[(index.fqn, tuple(index.offset))]

    return RegionLoadPlanner()


def read_regions(directory: str, requests: list[tuple[str, Optional[int], tuple[int, ...], torch.dtype]]
                 ) -> list[torch.Tensor]:
    """For each (key, layer or None, shape of the region, dtype): the tensor (one layer of a
    layer-stacked tensor, or the whole tensor)."""
    import torch.distributed.checkpoint as dcp

    planned = []
    out = []
    for key, layer, shape, dtype in requests:
        if layer is None:
            buf = torch.empty(shape, dtype=dtype)
            planned.append((key, (0,) * len(shape), buf))
            out.append(buf)
        else:
            buf = torch.empty((1, *shape), dtype=dtype)
            planned.append((key, (layer,) + (0,) * len(shape), buf))
            out.append(buf[0])
    dcp.load({}, storage_reader=dcp.FileSystemReader(directory), planner=_region_planner(planned),
             no_dist=True)
    return out
