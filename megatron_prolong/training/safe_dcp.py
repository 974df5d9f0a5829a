"""Reading megatron-core distributed checkpoints (torch_dist) without unpickling untrusted data.

`SafeFileSystemReader` is torch.distributed.checkpoint's FileSystemReader with three changes:
`.metadata` goes through the allow-list unpickler (safe_unpickle.py) instead of `pickle.load`;
the extra-state objects of the shards go through it instead of `torch.load(weights_only=False)`
(DefaultLoadPlanner.load_bytes); and every shard file the metadata names must be a plain file
name inside the checkpoint directory (no `..`, no sub-path). Tensor data was already read by
torch with `weights_only=True`.

`load_distributed` is megatron's `dist_checkpointing.load` with this reader and a common-state
strategy that reads `common.pt` through the same allow-list. megatron-core 0.16.1 builds its
reader inside TorchDistLoadShardedStrategy through the module function `_get_filesystem_reader`
(no hook to pass one in), so the strategy below swaps that function while it runs; if a later
megatron-core drops the name, `mock.patch.object` raises instead of silently reading unsafely.
"""
from __future__ import annotations

import contextlib
import os
from unittest import mock

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.common import (COMMON_STATE_FNAME,
                                                                TorchCommonLoadStrategy)
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_prolong.training.safe_unpickle import RefusedPickle, load_pickle, load_torch


class _ExtraStateThroughAllowList:
    """The load planner as FileSystemReader.read_data sees it, with `load_bytes` deserializing
    through the allow-list (the rest is the planner's own)."""

    def __init__(self, planner, where: str) -> None:
        if not isinstance(planner, DefaultLoadPlanner):
            raise TypeError(f"internal: unexpected load planner {type(planner).__name__}")
        self._planner, self._where = planner, where

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_torch(value, f"{self._where} (object {fqn})")
        planner = self._planner
        # What DefaultLoadPlanner.load_bytes does with the object it unpickled.
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj


class SafeFileSystemReader(FileSystemReader):
    def __init__(self, path) -> None:
        super().__init__(path)
        self._metadata = None  # read once per load (megatron reads it several times)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_pickle(stream, str(path))
            if not isinstance(metadata, Metadata):
                raise RefusedPickle(f"{path}: holds a {type(metadata).__name__}, not "
                                    "torch.distributed.checkpoint Metadata; the file is damaged")
            _check_storage_paths(metadata, str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _ExtraStateThroughAllowList(planner, str(self.path)))


def _check_storage_paths(metadata: Metadata, where: str) -> None:
    """Every shard file must be a plain name in the checkpoint's own directory."""
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if (not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name
                or "\\" in name or "\0" in name):
            raise RefusedPickle(f"{where}: names the shard file {name!r}, which is not a file "
                                "in the checkpoint's own directory; refusing to read outside it")


def shard_extent_problems(directory: str) -> list[str]:
    """Stat only: shard files that the metadata says are longer than they are (a truncated
    copy or a disk that filled up), for checkpoints without a manifest."""
    metadata = SafeFileSystemReader(directory).read_metadata()
    need: dict = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(need.items()):
        path = os.path.join(directory, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual is None or actual < size:
            problems.append(f"{path} is {'missing' if actual is None else f'{actual} bytes'}, "
                            f"its metadata needs {size} (truncated)")
    return problems


@contextlib.contextmanager
def _safe_reader():
    with mock.patch.object(mcore_torch_strategy, "_get_filesystem_reader",
                           lambda checkpoint_dir, cache_metadata=False:
                           SafeFileSystemReader(checkpoint_dir)):
        yield


class SafeTorchDistLoadStrategy(mcore_torch_strategy.TorchDistLoadShardedStrategy):
    def load(self, sharded_state_dict, checkpoint_dir):
        with _safe_reader():
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with _safe_reader():
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _safe_reader():
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    def load_common(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            raise RefusedPickle(f"{path} is missing; the checkpoint is incomplete")
        return load_torch(path, path)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # Only the legacy per-object `.pt` layout uses this; torch_dist stores objects in shards.
        raise RefusedPickle(f"{checkpoint_dir}: per-object .pt files (a pre-torch_dist layout) "
                            "are not read; re-save the checkpoint with torch_dist")


def wrapped_errors(exc: BaseException):
    """`exc` and every error inside it: causes, contexts, and the per-rank failures that
    torch.distributed.checkpoint collects into one CheckpointException."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # rank -> error (or (error, traceback))
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


@contextlib.contextmanager
def refusals_unwrapped():
    """A refusal raised inside torch.distributed.checkpoint's collectives reaches the caller
    as itself (one line naming the file), not as a CheckpointException with tracebacks."""
    try:
        yield
    except BaseException as exc:  # CheckpointException derives from BaseException
        refused = next((e for e in wrapped_errors(exc) if isinstance(e, RefusedPickle)), None)
        if refused is None or refused is exc:
            raise
        raise RefusedPickle(str(refused)) from None


def load_distributed(sharded_state_dict: dict, directory: str) -> dict:
    """Collective: megatron's dist_checkpointing.load, every unpickling through the allow-list."""
    with refusals_unwrapped():
        return dist_checkpointing.load(sharded_state_dict, directory,
                                       sharded_strategy=SafeTorchDistLoadStrategy(),
                                       common_strategy=SafeCommonLoadStrategy())
