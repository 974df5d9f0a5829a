"""A reader for mosaicml-streaming MDS data (the format of the released ProLong data), with
format errors that name the shard and the sample.

No dependency on the streaming package. Layout: a directory with ``index.json`` listing shards;
each shard file is ``uint32 n`` + ``uint32 offsets[n+1]`` (absolute byte offsets) + the writer's
config + samples. A sample starts with a uint32 size for every variable-size column, then the
columns' bytes. Shards may be zstd-compressed (``zip_data``).

The ProLong release (princeton-nlp/prolong-data-64K, -512K, prolong-ultrachat-64K) has, per
domain directory, a merged ``index.json`` whose shard names are ``procNN-64/shard.NNNNN.mds``,
and every ``procNN-64/`` keeps its own ``index.json`` too (the ultrachat set: a root index.json
over ``0-0/``). ProLong's loader reads one stream per domain directory; so does
``find_streams``: a directory with an index.json is one stream and nothing below it is read
separately, so each sample is read once.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from ..folder_paths import OutsideFolder, is_other_than_regular_file, path_inside

_SCALARS = {n: np.dtype(n) for n in ("uint8", "uint16", "uint32", "uint64", "int8", "int16",
                                      "int32", "int64", "float16", "float32", "float64")}
_NDARRAY_CODES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32",
                  33: "int32", 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_OTHER_ENCODINGS = ("str", "bytes", "int", "json", "pkl")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
LFS_HINT = ("it is a Git-LFS pointer file, not the data: the repository was cloned without "
            "git-lfs. Run `git lfs pull` in the clone, or download with `huggingface-cli download "
            "--repo-type dataset ...`")


class MDSFormatError(ValueError):
    """The input is not the MDS data it claims to be; the message names the file (and sample)."""


def is_lfs_pointer(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


# ---------------------------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------------------------
def encoding_supported(encoding: str) -> bool:
    if encoding.startswith("ndarray"):
        parts = encoding.split(":")
        return len(parts) <= 3 and (len(parts) < 2 or not parts[1] or parts[1] in _SCALARS)
    return encoding in _SCALARS or encoding in _OTHER_ENCODINGS


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
    """One column's value; raises (ValueError, KeyError, IndexError...) on bytes that do not
    decode, which the sample reader turns into a message naming shard, sample and column."""
    if encoding.startswith("ndarray"):
        return _decode_ndarray(encoding, data)
    if encoding == "str":
        return data.decode("utf-8")
    if encoding == "bytes":
        return data
    if encoding == "int":
        (value,) = np.frombuffer(data, np.int64)
        return int(value)
    if encoding in _SCALARS:
        (value,) = np.frombuffer(data, _SCALARS[encoding])
        return value.item()
    if encoding == "json":
        return json.loads(data.decode("utf-8"))
    if encoding == "pkl":
        if not allow_pickle:
            raise MDSFormatError("column uses 'pkl' (pickle) encoding; pass --allow-pickle only "
                                 "for data you trust")
        return pickle.loads(data)
    raise MDSFormatError(f"unsupported MDS column encoding {encoding!r}")


# ---------------------------------------------------------------------------------------------
# Streams and their index
# ---------------------------------------------------------------------------------------------
def find_streams(root: str) -> list[str]:
    """The stream directories under root (root included), sorted: a directory holding an
    index.json is one stream and is not searched further (its procNN-64/ parts are listed by its
    merged index)."""
    if not os.path.isdir(root):
        raise MDSFormatError(f"{root}: not a directory (expected the downloaded MDS dataset)")
    streams = []
    for d, subdirs, files in os.walk(root):
        subdirs.sort()
        if "index.json" in files:
            streams.append(d)
            subdirs.clear()  # the merged index covers them
    if not streams:
        raise MDSFormatError(f"{root}: no index.json in it or below: not an MDS dataset")
    return sorted(streams)


@dataclass
class Shard:
    stream: str            # the stream directory
    name: str              # path relative to the stream, e.g. proc03-64/shard.00012.mds
    samples: int
    columns: list[tuple[str, str, Optional[int]]]  # (name, encoding, fixed size or None)
    raw_bytes: Optional[int]
    zip_name: Optional[str]
    zip_bytes: Optional[int]
    compression: Optional[str]

    @property
    def where(self) -> str:
        return os.path.join(self.stream, self.name)


def read_index(stream: str) -> list[Shard]:
    """The shards index.json lists, checked before any data is read: format, column encodings
    and that every shard file is present with the size the index records."""
    path = os.path.join(stream, "index.json")
    if is_lfs_pointer(path):
        raise MDSFormatError(f"{path}: {LFS_HINT}")
    try:
        with open(path) as f:
            index = json.load(f)
        entries = index["shards"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise MDSFormatError(f"{path}: not an MDS index ({type(exc).__name__}: {exc})") from None
    shards = []
    for k, e in enumerate(entries):
        try:
            raw, zipped = e["raw_data"], e.get("zip_data")
            shard = Shard(stream, raw["basename"], int(e["samples"]),
                          list(zip(e["column_names"], e["column_encodings"], e["column_sizes"])),
                          _size(raw.get("bytes")), zipped and zipped["basename"],
                          zipped and _size(zipped.get("bytes")), e.get("compression"))
            fmt = e.get("format")
            # The index names the files to read: only files inside the stream's folder.
            for name in (shard.name, shard.zip_name):
                if name is not None:
                    path_inside(stream, name)
        except OutsideFolder as exc:
            raise MDSFormatError(f"{path}: shard entry {k}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise MDSFormatError(f"{path}: shard entry {k} is malformed ({type(exc).__name__}: "
                                 f"{exc})") from None
        if fmt != "mds":
            raise MDSFormatError(f"{shard.where}: shard format {fmt!r} is not mds")
        for col, enc, _ in shard.columns:
            if not isinstance(enc, str) or not encoding_supported(enc):
                raise MDSFormatError(f"{shard.where}: column {col!r} has type {enc!r}, which "
                                     "this reader does not know")
        _check_present(shard)
        shards.append(shard)
    return shards


def _size(value) -> Optional[int]:
    """A byte count from the index: None or a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"byte count {value!r} is not a non-negative integer")
    return value


def _check_present(shard: Shard) -> None:
    raw = os.path.join(shard.stream, shard.name)
    if os.path.exists(raw):
        _check_file(raw, shard.raw_bytes)
        return
    if shard.zip_name and os.path.exists(os.path.join(shard.stream, shard.zip_name)):
        if not (shard.compression or "").startswith("zstd"):
            raise MDSFormatError(f"{shard.where}: compression {shard.compression!r} is not "
                                 "supported (zstd only)")
        if shard.raw_bytes is None:  # the bound on what decompressing may produce
            raise MDSFormatError(f"{shard.where}: index.json records no size (raw_data.bytes) "
                                 "for this compressed shard; it is not decompressed unbounded")
        _check_file(os.path.join(shard.stream, shard.zip_name), shard.zip_bytes)
        return
    raise MDSFormatError(f"{shard.where}: missing (index.json lists it; incomplete download?)")


def _check_file(path: str, expected: Optional[int]) -> None:
    if is_other_than_regular_file(path):  # e.g. a link to /dev/zero: reading never ends
        raise MDSFormatError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size != expected and is_lfs_pointer(path):
        raise MDSFormatError(f"{path}: {LFS_HINT}")
    if expected is not None and size != expected:
        raise MDSFormatError(f"{path}: {size} bytes, index.json says {expected}: "
                             f"{'truncated' if size < expected else 'not the indexed file'}; "
                             "download the shard again")


def _shard_bytes(shard: Shard) -> bytes:
    raw = os.path.join(shard.stream, shard.name)
    if os.path.exists(raw):
        with open(raw, "rb") as f:  # its size was checked against the index
            return f.read() if shard.raw_bytes is None else f.read(shard.raw_bytes)
    import zstandard

    # At most one byte more than the index records: a shard that expands further (a
    # decompression bomb, a mislabelled file) is refused without being decompressed.
    limit = shard.raw_bytes
    with open(os.path.join(shard.stream, shard.zip_name), "rb") as f:
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            parts, n = [], 0
            while n <= limit:
                part = reader.read(min(1 << 24, limit + 1 - n))
                if not part:
                    break
                parts.append(part)
                n += len(part)
        except zstandard.ZstdError as exc:
            raise MDSFormatError(f"{shard.where}: does not decompress ({exc})") from None
    if n != limit:
        raise MDSFormatError(f"{shard.where}: decompresses to "
                             f"{'more than ' if n > limit else ''}{min(n, limit)} bytes, "
                             f"index.json says {limit}")
    return b"".join(parts)


def _sample_offsets(shard: Shard, data: bytes) -> np.ndarray:
    """The n+1 sample offsets of a shard, after checking its header is consistent."""
    if len(data) < 4:
        raise MDSFormatError(f"{shard.where}: {len(data)} bytes, too short for an MDS shard")
    n = int(np.frombuffer(data[:4], np.uint32)[0])
    if n != shard.samples:
        raise MDSFormatError(f"{shard.where}: header says {n} samples, index.json says "
                             f"{shard.samples}: the shard is garbled or not the indexed one")
    header_end = 8 + 4 * n
    if len(data) < header_end:
        raise MDSFormatError(f"{shard.where}: truncated inside its header")
    offsets = np.frombuffer(data[4:header_end], np.uint32).astype(np.int64)
    # the writer's config (JSON) sits between the offsets and the first sample
    if offsets[0] < header_end or (np.diff(offsets) < 0).any() or offsets[-1] != len(data):
        raise MDSFormatError(f"{shard.where}: garbled sample offsets (first {offsets[0]}, last "
                             f"{offsets[-1]}, file {len(data)} bytes)")
    return offsets


def iter_shard(shard: Shard, allow_pickle: bool = False) -> Iterator[tuple[int, dict]]:
    """(sample index, decoded sample) for every sample of one shard, one shard in memory."""
    data = _shard_bytes(shard)
    offsets = _sample_offsets(shard, data)
    n_var = sum(1 for _, _, size in shard.columns if size is None)
    fixed_bytes = sum(size for _, _, size in shard.columns if size is not None)
    for k in range(shard.samples):
        blob = data[offsets[k]:offsets[k + 1]]
        sizes = np.frombuffer(blob[:4 * n_var], np.uint32).tolist() if len(blob) >= 4 * n_var else []
        if len(sizes) != n_var or 4 * n_var + sum(sizes) + fixed_bytes != len(blob):
            raise MDSFormatError(f"{shard.where} sample {k}: garbled (its column sizes do not "
                                 f"add up to its {len(blob)} bytes)")
        var = iter(sizes)
        pos, sample = 4 * n_var, {}
        for col, enc, size in shard.columns:
            size = next(var) if size is None else size
            try:
                sample[col] = decode_column(enc, blob[pos:pos + size], allow_pickle)
            except MDSFormatError as exc:
                raise MDSFormatError(f"{shard.where} sample {k} column {col!r}: {exc}") from None
            except (ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
                raise MDSFormatError(f"{shard.where} sample {k} column {col!r}: does not decode "
                                     f"as {enc} ({type(exc).__name__}: {exc})") from None
            pos += size
        yield k, sample

