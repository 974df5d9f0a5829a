"""megatron-core distributed checkpoints (torch_dist): writing one from full tensors, reading
regions of one back.

Writing asks a TP=1/PP=1 GPTModel built on the meta device (no memory, no init) for its
sharded_state_dict: megatron's own keys, chunks (the SwiGLU fc1 factory's [gate; up] split) and
extra-state objects, i.e. what training/weights.save_model_weights would write and
load_model_weights expects at any TP/PP/CP layout. The data are then produced one mapped tensor at
a time while torch.distributed.checkpoint writes them, so memory holds one tensor, not the model.

Reading uses torch.distributed.checkpoint directly (through training/safe_dcp's reader: no
unpickling outside the allow-list) with a planner that asks for one region (one
layer of one tensor) at a time: no process group, no model, and only that region in memory,
whatever layout the checkpoint was saved in (dist_checkpointing's own loader needs every
fragment of a tensor requested at once on a single process).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
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


@contextlib.contextmanager
def _single_process_dcp():
    """torch.distributed.checkpoint used on purpose without a process group (no_dist=True):
    silence its warning that it assumes a single process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                                "uninitialized", category=UserWarning)
        yield


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
    init_model_parallel(Layout(world_size=1, tp=1, pp=1, cp=1, dp=1, num_microbatches=1), seed=0)


def _checkpoint_plan(model: ModelConfig) -> tuple[list, dict]:
    """What save_model_weights would write for this model, without its data: megatron's
    ShardedTensors / ShardedObjects (factories applied) of a TP1/PP1 model built on the meta device,
    and the common (non-sharded) state."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    from megatron_prolong.model.llama import build_llama

    single_process_model_parallel()
    with torch.device("meta"):  # no allocation, no random init
        gpt = build_llama(model, ParallelConfig(), on_cpu=True, use_te=False)
    sharded, common = save_preprocess(gpt.sharded_state_dict())
    return list(nested_values(sharded)), common


def _lazy_save_planner(items: list, produce):
    """A torch.distributed.checkpoint save planner for the given write items whose tensors are
    produced (`produce(write_item)`) only when the writer gets to them."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class LazySavePlanner(DefaultSavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            self.state_dict, self.is_coordinator, self.mappings = {}, is_coordinator, {}

        def create_local_plan(self):
            self.plan = SavePlan(items=list(items))
            return self.plan

        def resolve_data(self, write_item):
            return produce(write_item)

    return LazySavePlanner(flatten_state_dict=False)


def save_mcore_checkpoint(model: ModelConfig, dtype: torch.dtype, produce_unit, directory: str) -> None:
    """Write the distributed checkpoint of `model`, asking `produce_unit(unit)` for each mapped
    tensor (full, TP=1 layout) only when it is written, and keeping only the latest one.

    The keys, chunks and extra-state objects are megatron's own (from the model's
    sharded_state_dict), so load_model_weights reads the result at any TP/PP/CP layout."""
    import io

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import (get_default_save_common_strategy,
                                                                get_default_save_sharded_strategy)
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    from megatron_prolong.convert import llama_mapping as lm

    sharded, common = _checkpoint_plan(model)
    by_key = {lm.Unit(r, 0).checkpoint_key: r for r in lm.LLAMA_RULES}
    items = []
    for sh in sharded:
        if isinstance(sh, ShardedObject):  # serialized as megatron's torch_dist strategy does
            blob = io.BytesIO()
            torch.save([sh.data], blob)
            items.append((WriteItem(MetadataIndex(sh.unique_key), WriteItemType.BYTE_IO), blob))
            continue
        if not isinstance(sh, ShardedTensor) or sh.key not in by_key or sh.flattened_range is not None:
            raise ConversionError(f"internal: {sh} is not covered by the Llama mapping")
        rule = by_key[sh.key]
        if tuple(sh.global_shape) != lm.checkpoint_shape(rule, model):
            raise ConversionError(f"internal: {sh.key} has global shape {sh.global_shape}, the "
                                  f"mapping says {lm.checkpoint_shape(rule, model)}")
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        chunk = ChunkStorageMetadata(offsets=torch.Size(sh.global_offset), sizes=torch.Size(sizes))
        data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=dtype),
                               size=torch.Size(sh.global_shape))
        unit = lm.Unit(rule, sh.global_offset[0] if rule.per_layer else None)
        items.append((WriteItem(MetadataIndex(sh.key, sh.global_offset), WriteItemType.SHARD,
                                tensor_data=data), unit))
    lookup = {item.index: what for item, what in items}
    latest: dict = {}

    def produce(write_item):
        what = lookup[write_item.index]
        if isinstance(what, io.BytesIO):
            return what
        if what not in latest:  # e.g. fc1's gate and up chunks come from one unit
            latest.clear()
            latest[what] = produce_unit(what).to(dtype)
        full = latest[what]
        chunk = write_item.tensor_data.chunk
        region = full.reshape(1, *full.shape) if what.rule.per_layer else full
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            start = 0 if (dim == 0 and what.rule.per_layer) else offset
            region = region.narrow(dim, start, size)
        return region

    sharded_strategy = get_default_save_sharded_strategy()
    common_strategy = get_default_save_common_strategy()
    os.makedirs(directory, exist_ok=True)
    common_strategy.save_common(common, directory)
    # One file per item: the writer keeps every tensor of a file alive until the file is closed.
    writer = dcp.FileSystemWriter(directory, single_file_per_rank=False, thread_count=1)
    planner = _lazy_save_planner([item for item, _ in items], produce)
    with _single_process_dcp():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    save_config(CheckpointingConfig(sharded_strategy.backend, sharded_strategy.version,
                                    common_strategy.backend, common_strategy.version), directory)
    from megatron_prolong.training import manifest

    manifest.write_manifest(directory, [manifest.digest_own_files(directory)])


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def tensor_metadata(directory: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in the checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_prolong.training.safe_dcp import SafeFileSystemReader

    check_checkpoint_dir(directory)
    verify_checkpoint_files(directory)
    md = SafeFileSystemReader(directory).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def verify_checkpoint_files(directory: str) -> None:
    """Every file against the manifest of the checkpoint (`directory` itself for a weights
    directory, the step directory above a training checkpoint's dist/)."""
    import sys

    from megatron_prolong.training import manifest

    parent = os.path.dirname(os.path.abspath(directory))
    root = (parent if os.path.basename(os.path.normpath(directory)) == "dist"
            and os.path.isfile(os.path.join(parent, manifest.MANIFEST)) else directory)
    has_manifest, problems = manifest.verify(root)
    if problems:
        raise ConversionError("; ".join(problems) + "; the checkpoint is damaged: convert another")
    if not has_manifest:
        print(f"warning: {root} has no {manifest.MANIFEST} (saved before checkpoints carried "
              "digests): converting it unverified", file=sys.stderr, flush=True)


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

    from megatron_prolong.training.safe_dcp import SafeFileSystemReader, refusals_unwrapped

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
    with _single_process_dcp(), refusals_unwrapped():
        dcp.load({}, storage_reader=SafeFileSystemReader(directory),
                 planner=_region_planner(planned), no_dist=True)
    return out
