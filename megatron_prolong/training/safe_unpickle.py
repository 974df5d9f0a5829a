"""Unpickling of checkpoint files through an allow-list: nothing read from disk runs code.

torch.distributed.checkpoint stores its `.metadata` with plain pickle and reads it back with
`pickle.load`; megatron-core's extra-state objects (`*._extra_state`, stored inside the
`.distcp` shards) come back through `torch.load(weights_only=False)`; `common.pt` is a
torch.save file. A pickle may name any importable callable and have it called, so each of
these would run code hidden in a crafted checkpoint. Here every such read goes through
`RestrictedUnpickler`, whose `find_class` hands out only the classes listed below (the ones a
checkpoint saved by this project contains, enumerated from real TP/PP/DP training saves and
tools/convert.py hf-to-mcore output) and refuses
anything else with one line naming the file and the global.

Megatron-LM and torchtitan read the same files with plain pickle; this module is why the
project does not (docs/security.md).
"""
from __future__ import annotations

import io
import pickle
import types
from typing import IO, Any

import torch

from megatron_prolong.config import ConfigError

# (module, name) pairs a checkpoint may name. Metadata of torch.distributed.checkpoint:
_DCP = "torch.distributed.checkpoint."
ALLOWED_GLOBALS = frozenset({
    (_DCP + "metadata", "Metadata"),
    (_DCP + "metadata", "MetadataIndex"),
    (_DCP + "metadata", "StorageMeta"),
    (_DCP + "metadata", "TensorProperties"),
    (_DCP + "metadata", "TensorStorageMetadata"),
    (_DCP + "metadata", "BytesStorageMetadata"),
    (_DCP + "metadata", "ChunkStorageMetadata"),
    (_DCP + "metadata", "_MEM_FORMAT_ENCODING"),
    (_DCP + "planner", "SavePlan"),
    (_DCP + "planner", "WriteItem"),
    (_DCP + "planner", "WriteItemType"),
    (_DCP + "planner", "TensorWriteData"),
    (_DCP + "filesystem", "_StorageInfo"),
    # torch.Size and the layout lookup in TensorProperties; tensors in common.pt / extra state
    # StorageMeta.checkpoint_id as torch's own FileSystemWriter stores it (tools/convert.py
    # hf-to-mcore output); rebuilding a path object touches no file.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    # Transformer Engine layers hand megatron their FP8 state as a BytesIO (a plain buffer).
    ("_io", "BytesIO"),
})
# dtypes, layouts and memory formats are plain torch attributes (torch.float32, ...)
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class RefusedPickle(ConfigError):
    """A checkpoint file that names a global outside the allow-list (exit 2)."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come only from ALLOWED_GLOBALS (and torch dtypes).
    `where` names the file in the error."""

    where = "(unnamed)"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise RefusedPickle(
            f"{self.where}: refused to unpickle {module}.{name}, which is not a type a "
            "checkpoint holds; the file may be crafted to run code: do not load it, restore "
            "the checkpoint from a trusted copy (docs/security.md)")


def _unpickler_for(where: str) -> type:
    return type("RestrictedUnpickler", (RestrictedUnpickler,), {"where": where})


def load_pickle(stream: IO[bytes], where: str) -> Any:
    """A plain pickle stream (torch.distributed.checkpoint's `.metadata`)."""
    try:
        return _unpickler_for(where)(stream).load()
    except RefusedPickle:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or garbled: name the file
        raise RefusedPickle(f"{where}: unreadable pickle ({type(exc).__name__}: {exc}); the "
                            "file is damaged: use another checkpoint") from None


def load_torch(source: "str | io.BytesIO", where: str) -> Any:
    """A torch.save file or buffer (common.pt, extra-state blobs): tensors are rebuilt by torch,
    every other global goes through the allow-list."""
    cls = _unpickler_for(where)
    module = types.SimpleNamespace(__name__="megatron_prolong_restricted_pickle", Unpickler=cls,
                                   load=lambda f, **kw: cls(f, **kw).load())
    try:
        return torch.load(source, map_location="cpu", weights_only=False, pickle_module=module)
    except RefusedPickle:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RefusedPickle(f"{where}: unreadable ({type(exc).__name__}: {exc}); the file is "
                            "damaged: use another checkpoint") from None
