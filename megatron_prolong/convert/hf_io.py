"""HF checkpoint files: reading (safetensors shards + index, or PyTorch .bin) and writing
sharded safetensors with an index, one tensor at a time.

Reading checks the shards before any tensor is loaded: every file the index names lies inside
the checkpoint directory (megatron_prolong/folder_paths.py) and exists, every
safetensors header parses and the file holds all the bytes the header promises (a truncated
download is refused, not discovered half-way). Writing lays out each shard's header from the
planned shapes first and then streams the tensors' bytes, so only the tensor being written is in
memory, whatever the shard size.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from megatron_prolong.convert.errors import ConversionError
from megatron_prolong.folder_paths import OutsideFolder, is_other_than_regular_file, path_inside

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "original/tokenizer.model", "added_tokens.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, after checking that no byte is missing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated ({size} bytes; not even a safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated inside its header ({size} bytes, header "
                                  f"needs {8 + n}); download the shard again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated: the header promises {8 + n + end} bytes, the file "
                              f"has {size}; download the shard again")
    return header


class HFCheckpoint:
    """Tensor names, dtypes and shapes of an HF checkpoint directory; tensors loaded on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[str, object] = {}
        if os.path.exists(os.path.join(directory, SAFE_INDEX)):
            self._index(SAFE_INDEX, self._scan_safetensors)
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            self._scan_safetensors("model.safetensors", None)
        elif os.path.exists(os.path.join(directory, BIN_INDEX)):
            self._index(BIN_INDEX, self._scan_bin)
        elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
            self._scan_bin("pytorch_model.bin", None)
        else:
            raise ConversionError(
                f"{directory}: no weights found (expected {SAFE_INDEX}, model.safetensors, "
                f"{BIN_INDEX} or pytorch_model.bin)")

    def _index(self, index_name: str, scan) -> None:
        index_path = os.path.join(self.directory, index_name)
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index_path}: not a valid index ({exc})") from None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path}: not a valid index (weight_map is not a mapping)")
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            try:  # the index names the files to read: only regular files inside the directory
                path = path_inside(self.directory, file)
                if is_other_than_regular_file(path):
                    raise OutsideFolder(f"{file!r} is not a regular file")
            except OutsideFolder as exc:
                raise ConversionError(f"{index_path}: weight {name!r}: {exc}") from None
            by_file.setdefault(file, set()).add(name)
        missing = sorted(f for f in by_file if not os.path.exists(os.path.join(self.directory, f)))
        if missing:
            raise ConversionError(f"{index_path}: shards missing from {self.directory}: {missing}; "
                                  "download them (or fix the index)")
        for file, names in sorted(by_file.items()):
            scan(file, names)

    def _scan_safetensors(self, file: str, expected: Optional[set[str]]) -> None:
        header = read_safetensors_header(os.path.join(self.directory, file))
        names = {k for k in header if k != "__metadata__"}
        self._check_index(file, names, expected)
        for name in names:
            code = header[name]["dtype"]
            if code not in SAFETENSORS_DTYPES:
                raise ConversionError(f"{file}: {name} has unsupported dtype {code}")
            self.tensors[name] = TensorInfo(file, SAFETENSORS_DTYPES[code], tuple(header[name]["shape"]))

    def _scan_bin(self, file: str, expected: Optional[set[str]]) -> None:
        path = os.path.join(self.directory, file)
        try:  # mmap: the file's pages are read when a tensor is used, not now
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise ConversionError(f"{path}: cannot be read ({exc}); truncated download?") from None
        self._check_index(file, set(state), expected)
        self._handles[file] = state
        for name, t in state.items():
            self.tensors[name] = TensorInfo(file, t.dtype, tuple(t.shape))

    def _check_index(self, file: str, names: set[str], expected: Optional[set[str]]) -> None:
        if expected is not None and not expected <= names:
            absent = sorted(expected - names)
            raise ConversionError(f"{file}: the index places {absent[:5]}{'...' if len(absent) > 5 else ''} "
                                  "in this shard but it does not hold them; the shard is stale or "
                                  "truncated")

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.endswith(".bin"):
            return self._handles[info.file][name]
        from safetensors import safe_open

        # Opened per tensor: a handle kept open keeps every page it has read mapped (resident).
        with safe_open(os.path.join(self.directory, info.file), framework="pt") as handle:
            return handle.get_tensor(name)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / a byte count -> bytes."""
    t = text.strip().upper()
    units = [("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
             ("KB", 10**3), ("B", 1)]
    for suffix, scale in units:
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConversionError(f"shard size {text!r}: expected e.g. 5GB, 500MB or a byte count") from None


def plan_shards(groups: list[list[PlannedTensor]], max_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy shards of at most max_bytes; a group (e.g. q, k, v of one layer) is never split."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for group in groups:
        g = sum(t.nbytes for t in group)
        if shards[-1] and size + g > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += g
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class SafetensorsStreamWriter:
    """One safetensors file, written tensor by tensor in the planned order."""

    def __init__(self, path: str, plan: list[PlannedTensor]):
        self.path, self.plan, self._next = path, plan, 0
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in plan:
            header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.plan[self._next]
        if name != want.name or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise ConversionError(f"{self.path}: expected {want.name} {want.dtype} {list(want.shape)}, "
                                  f"got {name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close and delete a file that will not be completed."""
        self._file.close()
        os.remove(self.path)

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.plan):
            raise ConversionError(f"{self.path}: {len(self.plan) - self._next} planned tensors were "
                                  "never written")


def write_sharded(directory: str, shards: list[list[PlannedTensor]],
                  tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Stream `tensors` (in the planned order) into the shards, then write the index last: a
    directory without its index is an unfinished conversion."""
    weight_map, total = {}, 0
    stream: Iterator = iter(tensors)
    for i, plan in enumerate(shards):
        name = shard_name(i, len(shards))
        writer = SafetensorsStreamWriter(os.path.join(directory, name), plan)
        try:
            for _ in plan:
                writer.write(*next(stream))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        for t in plan:
            weight_map[t.name] = name
            total += t.nbytes
    with open(os.path.join(directory, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files HF's AutoTokenizer reads; refuse a directory without any."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    if not copied:
        raise ConversionError(f"--tokenizer-dir {src}: none of {list(TOKENIZER_FILES)} found there")
    return copied
