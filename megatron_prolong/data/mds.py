"""A small reader for mosaicml-streaming MDS shards (the format of the released ProLong data).

No dependency on the streaming package. Format: a directory with ``index.json`` listing shards;
each shard file is ``uint32 n`` + ``uint32 offsets[n+1]`` (absolute byte offsets) + samples.
A sample starts with a uint32 size for every variable-size column, then the columns' bytes.
Shards may be zstd-compressed (``zip_data``), in which case the raw file is decompressed.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any, Iterator

import numpy as np

_SCALARS = {n: np.dtype(n) for n in ("uint8", "uint16", "uint32", "uint64", "int8", "int16",
                                      "int32", "int64", "float16", "float32", "float64")}
_NDARRAY_CODES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32",
                  33: "int32", 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}


class MDSFormatError(ValueError):
    pass


def _decode_ndarray(spec: str, data: bytes) -> np.ndarray:
    parts = spec.split(":")[1:]
    i = 0
    if parts and parts[0]:
        dtype = parts[0]
    else:
        dtype, i = _NDARRAY_CODES[data[0]], 1
    if len(parts) > 1:
        shape = tuple(int(x) for x in parts[1].split(","))
    else:
        ndim, code = data[i] >> 2, data[i] & 3
        sdt = ("uint8", "uint16", "uint32", "uint64")[code]
        nbytes = ndim * (1 << code)
        shape = tuple(np.frombuffer(data[i + 1:i + 1 + nbytes], sdt).tolist())
        i += 1 + nbytes
    return np.frombuffer(data[i:], dtype).reshape(shape)


def decode_column(encoding: str, data: bytes, allow_pickle: bool = False) -> Any:
    if encoding.startswith("ndarray"):
        return _decode_ndarray(encoding, data)
    if encoding == "str":
        return data.decode("utf-8")
    if encoding == "bytes":
        return data
    if encoding == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if encoding in _SCALARS:
        return np.frombuffer(data, _SCALARS[encoding])[0].item()
    if encoding == "json":
        return json.loads(data.decode("utf-8"))
    if encoding == "pkl":
        if not allow_pickle:
            raise MDSFormatError("column uses 'pkl' (pickle) encoding; pass --allow-pickle only "
                                 "for data you trust")
        return pickle.loads(data)
    raise MDSFormatError(f"unsupported MDS column encoding {encoding!r}")


def find_mds_dirs(root: str) -> list[str]:
    """Every directory under root (root included) that holds an index.json, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MDS input {root!r} is not a directory")
    dirs = sorted(d for d, _, files in os.walk(root) if "index.json" in files)
    if not dirs:
        raise FileNotFoundError(f"no index.json under {root!r}: not an MDS dataset directory")
    return dirs


def _shard_bytes(dirname: str, shard: dict) -> bytes:
    raw = os.path.join(dirname, shard["raw_data"]["basename"])
    if os.path.exists(raw):
        with open(raw, "rb") as f:
            return f.read()
    zip_data = shard.get("zip_data")
    if zip_data and os.path.exists(os.path.join(dirname, zip_data["basename"])):
        comp = shard.get("compression") or ""
        if not comp.startswith("zstd"):
            raise MDSFormatError(f"{dirname}: shard compression {comp!r} not supported (zstd only)")
        import zstandard

        with open(os.path.join(dirname, zip_data["basename"]), "rb") as f:
            return zstandard.ZstdDecompressor().decompress(f.read(),
                                                           max_output_size=1 << 34)
    raise FileNotFoundError(f"{dirname}: shard {raw!r} is missing (incomplete download?)")


def iter_mds_samples(dirname: str, allow_pickle: bool = False
                     ) -> Iterator[tuple[str, int, dict]]:
    """Yield (shard basename, sample index in shard, decoded sample) for one MDS directory,
    one shard in memory at a time."""
    with open(os.path.join(dirname, "index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        if shard.get("format") != "mds":
            raise MDSFormatError(f"{dirname}: shard format {shard.get('format')!r} is not mds")
        names, encs = shard["column_names"], shard["column_encodings"]
        sizes = shard["column_sizes"]
        data = _shard_bytes(dirname, shard)
        name = shard["raw_data"]["basename"]
        n = int(np.frombuffer(data[:4], np.uint32)[0])
        if n != shard["samples"]:
            raise MDSFormatError(f"{dirname}/{name}: holds {n} samples, index.json says "
                                 f"{shard['samples']}")
        offsets = np.frombuffer(data[4:8 + 4 * n], np.uint32).astype(np.int64)
        if offsets[-1] > len(data):
            raise MDSFormatError(f"{dirname}/{name}: truncated ({len(data)} bytes, offsets "
                                 f"reach {offsets[-1]})")
        n_var = sum(1 for s in sizes if s is None)
        for k in range(n):
            blob = data[offsets[k]:offsets[k + 1]]
            var = iter(np.frombuffer(blob[:4 * n_var], np.uint32).tolist())
            pos, sample = 4 * n_var, {}
            for col, enc, size in zip(names, encs, sizes):
                size = next(var) if size is None else size
                sample[col] = decode_column(enc, blob[pos:pos + size], allow_pickle)
                pos += size
            yield name, k, sample
