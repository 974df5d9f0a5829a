"""Write MDS data (mosaicml-streaming's format, the one the ProLong release uses) without the
streaming package: for tests, and for making a small data set in the release's layout to try
tools/import_prolong_mds.py on (docs/data.md, "A tiny MDS data set").

The bytes are the ones mosaicml-streaming 0.13's MDSWriter writes for the same samples, columns
and size limit (tests/test_mds_writer.py compares them when streaming is importable): columns
in sorted name order; a shard is `uint32 n`, `uint32 offsets[n+1]` (absolute), the writer's
configuration as sorted JSON, then the samples, each a `uint32` size per variable-size column
followed by the columns' bytes; a new shard starts when the next sample would pass
`size_limit` (counting 4 bytes per sample and the header); `index.json` lists the shards.
Differences: pickle (`pkl`) and image columns are not written, a sample larger than the limit
gets a shard of its own instead of an empty shard before it, and zstd shards are compressed
with the `zstandard` module (a valid zstd frame, though not necessarily the same bytes).

`merge_index(parts, out)` writes the merged index.json of a directory over its parts, as the
release has it (`procNN-64/shard.NNNNN.mds`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from megatron_prolong.atomic_file import write_text_atomically

from .mds import _NDARRAY_CODES, _SCALARS, encoding_supported

_DTYPE_CODES = {name: code for code, name in _NDARRAY_CODES.items()}
_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")  # the code is the index
ZSTD_DEFAULT_LEVEL = 3


def _ndarray_parts(encoding: str) -> tuple[Optional[str], Optional[tuple[int, ...]]]:
    parts = encoding.split(":")[1:]
    dtype = parts[0] if parts and parts[0] else None
    shape = tuple(int(x) for x in parts[1].split(",")) if len(parts) > 1 else None
    return dtype, shape


def fixed_size(encoding: str) -> Optional[int]:
    """Bytes every value of the column takes, or None for a variable-size column."""
    if encoding == "int":
        return 8
    if encoding in _SCALARS:
        return _SCALARS[encoding].itemsize
    if encoding.startswith("ndarray"):
        dtype, shape = _ndarray_parts(encoding)
        if dtype is not None and shape is not None:
            return int(np.prod(shape)) * np.dtype(dtype).itemsize
    return None


def encode_column(encoding: str, value: Any) -> bytes:
    if encoding.startswith("ndarray"):
        return _encode_ndarray(encoding, np.asarray(value))
    if encoding == "str":
        return value.encode("utf-8")
    if encoding == "bytes":
        return bytes(value)
    if encoding == "int":
        return np.int64(value).tobytes()
    if encoding in _SCALARS:
        return _SCALARS[encoding].type(value).tobytes()
    if encoding == "json":
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value).encode()
    raise ValueError(f"MDS column encoding {encoding!r} is not written here; use ndarray[:dtype"
                     "[:shape]], str, bytes, int, json or a numeric type")


def _encode_ndarray(encoding: str, array: np.ndarray) -> bytes:
    dtype, shape = _ndarray_parts(encoding)
    if array.dtype.name not in _DTYPE_CODES:
        raise ValueError(f"{encoding}: arrays of {array.dtype.name} cannot be stored")
    if array.size == 0 or array.ndim == 0:
        raise ValueError(f"{encoding}: an empty array or a scalar cannot be stored")
    parts = []
    if dtype is None:
        parts.append(bytes([_DTYPE_CODES[array.dtype.name]]))
    elif array.dtype != np.dtype(dtype):
        raise ValueError(f"{encoding}: got an array of {array.dtype.name}")
    if shape is None:
        if array.ndim >= 64:
            raise ValueError(f"{encoding}: {array.ndim} axes, at most 63")
        code = next(i for i, t in enumerate(_SHAPE_DTYPES) if max(array.shape) < 1 << (8 << i))
        parts.append(bytes([array.ndim << 2 | code]))
        parts.append(np.array(array.shape, _SHAPE_DTYPES[code]).tobytes())
    elif array.shape != shape:
        raise ValueError(f"{encoding}: got an array of shape {array.shape}")
    parts.append(array.tobytes())
    return b"".join(parts)


def _compression_level(compression: Optional[str]) -> Optional[int]:
    if not compression:
        return None
    name, _, level = compression.partition(":")
    if name != "zstd" or (level and not (level.isdigit() and 1 <= int(level) <= 22)):
        raise ValueError(f"compression {compression!r}: only zstd (zstd:1 ... zstd:22) is written")
    return int(level) if level else ZSTD_DEFAULT_LEVEL


class MDSWriter:
    """`with MDSWriter(out=DIR, columns={name: encoding}) as w: w.write(sample)`; the shards
    and index.json are in DIR when the block ends without an error (with an error, the shards
    written so far are removed and no index.json is written)."""

    def __init__(self, out: str, columns: dict[str, str], compression: Optional[str] = None,
                 size_limit: Optional[int] = 1 << 26) -> None:
        for name, encoding in columns.items():
            if not encoding_supported(encoding) or encoding == "pkl":
                raise ValueError(f"column {name!r}: encoding {encoding!r} is not written here")
        if size_limit is not None and not 0 < size_limit < 1 << 32:
            raise ValueError(f"size_limit={size_limit}: must be in (0, 2**32): offsets are uint32")
        self.out, self.compression = out, compression or None
        self._level = _compression_level(self.compression)
        self.size_limit = size_limit
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [fixed_size(e) for e in self.encodings]
        self.config = {"version": 2, "format": "mds", "compression": self.compression,
                       "hashes": [], "size_limit": size_limit, "column_names": self.names,
                       "column_encodings": self.encodings, "column_sizes": self.sizes}
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode()
        self.shards: list[dict] = []
        self._written: list[str] = []
        self._samples: list[bytes] = []
        self._bytes = 0
        os.makedirs(out, exist_ok=True)

    def encode_sample(self, sample: dict) -> bytes:
        sizes, data = [], []
        for name, encoding, size in zip(self.names, self.encodings, self.sizes):
            value = encode_column(encoding, sample[name])
            if size is None:
                sizes.append(len(value))
            elif len(value) != size:
                raise ValueError(f"column {name!r}: {len(value)} bytes, {encoding} takes {size}")
            data.append(value)
        return np.array(sizes, np.uint32).tobytes() + b"".join(data)

    def write(self, sample: dict) -> None:
        encoded = self.encode_sample(sample)
        header = 8 + len(self._config_bytes)
        grown = header + self._bytes + len(encoded) + 4
        if self.size_limit and self._samples and grown > self.size_limit:
            self._flush()
        self._samples.append(encoded)
        self._bytes += len(encoded) + 4

    def _flush(self) -> None:
        n = len(self._samples)
        offsets = np.cumsum([0] + [len(s) for s in self._samples], dtype=np.int64)
        offsets += 4 + 4 * (n + 1) + len(self._config_bytes)
        raw = b"".join([np.uint32(n).tobytes(), offsets.astype(np.uint32).tobytes(),
                        self._config_bytes, *self._samples])
        name = f"shard.{len(self.shards):05d}.mds"
        entry = {"samples": n, "raw_data": {"basename": name, "bytes": len(raw), "hashes": {}},
                 "zip_data": None}
        if self._level is None:
            self._write_file(name, raw)
        else:
            import zstandard

            zipped = zstandard.ZstdCompressor(level=self._level).compress(raw)
            entry["zip_data"] = {"basename": f"{name}.zstd", "bytes": len(zipped), "hashes": {}}
            self._write_file(f"{name}.zstd", zipped)
        entry.update(self.config)
        self.shards.append(entry)
        self._samples, self._bytes = [], 0

    def _write_file(self, name: str, data: bytes) -> None:
        path = os.path.join(self.out, name)
        self._written.append(path)
        with open(path, "wb") as f:
            f.write(data)

    def finish(self) -> None:
        if self._samples:
            self._flush()
        write_text_atomically(os.path.join(self.out, "index.json"),
                              json.dumps({"version": 2, "shards": self.shards}, sort_keys=True))

    def discard(self) -> None:
        for path in self._written:
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "MDSWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.discard()


def merge_index(parts: list[str], out: str) -> None:
    """Write `out/index.json` over the part directories `parts` (each inside `out`, with its
    own index.json), naming each shard `<part>/<shard>` as the ProLong release does."""
    shards = []
    for part in parts:
        with open(os.path.join(part, "index.json")) as f:
            index = json.load(f)
        prefix = os.path.basename(os.path.normpath(part))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = os.path.join(prefix, shard[key]["basename"])
            shards.append(shard)
    write_text_atomically(os.path.join(out, "index.json"),
                          json.dumps({"version": 2, "shards": shards}))
