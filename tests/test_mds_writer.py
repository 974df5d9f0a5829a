"""The project's MDS writer (megatron_prolong/data/mds_writer.py): read back by the project's
reader, and byte-for-byte what mosaicml-streaming's own MDSWriter and merge_index write (the
cross-check runs where streaming is importable: scripts/setup.sh puts it in .test-deps/)."""
import json
import os

import numpy as np
import pytest

from megatron_prolong.data.mds import find_streams, iter_shard, read_index
from megatron_prolong.data.mds_writer import MDSWriter, merge_index
from test_data_helpers import import_streaming

# Every kind of column the writer knows: the release's four, an SFT mask, a fixed-shape array,
# an array of any dtype, scalars, json and bytes.
COLUMNS = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str",
           "length": "uint64", "mask": "ndarray:uint8", "pair": "ndarray:int16:2",
           "anything": "ndarray", "count": "int", "score": "float32", "meta": "json",
           "raw": "bytes"}


def samples(n=9, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(5, 300))
        cut = int(rng.integers(1, length))
        out.append({"input_ids": rng.integers(0, 128256, length).astype(np.uint32),
                    "indices": np.array([[0, cut], [cut, length]], np.uint32),
                    "domain": "." if k % 2 else "bööks", "length": length,
                    "mask": (rng.random(length) < 0.5).astype(np.uint8),
                    "pair": np.array([k, -k], np.int16),
                    "anything": rng.random((2, 3 + k)).astype(np.float32 if k % 2 else np.int64),
                    "count": -k, "score": 0.5 * k, "meta": {"k": k, "tags": ["a", "b"]},
                    "raw": bytes([k]) * k})
    return out


def read_all(directory):
    return [s for shard in read_index(directory) for _, s in iter_shard(shard)]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key, value in w.items():
            if isinstance(value, np.ndarray):
                assert g[key].dtype == value.dtype and np.array_equal(g[key], value), key
            else:
                assert g[key] == pytest.approx(value) if key == "score" else g[key] == value, key


@pytest.mark.parametrize("compression", [None, "zstd", "zstd:7"])
def test_the_readers_own_format_round_trips(tmp_path, compression):
    data = samples()
    with MDSWriter(out=str(tmp_path / "ds"), columns=COLUMNS, compression=compression,
                   size_limit=1 << 11) as w:
        for s in data:
            w.write(s)
    assert len(read_index(str(tmp_path / "ds"))) >= 3  # the size limit split it
    assert_same(read_all(str(tmp_path / "ds")), data)


def test_the_release_layout_with_merge_index(tmp_path):
    data = samples(6)
    for part, chunk in (("proc00-64", data[:4]), ("proc01-64", data[4:])):
        with MDSWriter(out=str(tmp_path / "book" / part), columns=COLUMNS, size_limit=1 << 11) as w:
            for s in chunk:
                w.write(s)
    merge_index([str(tmp_path / "book" / p) for p in ("proc00-64", "proc01-64")],
                str(tmp_path / "book"))
    assert find_streams(str(tmp_path)) == [str(tmp_path / "book")]
    names = [s.name for s in read_index(str(tmp_path / "book"))]
    assert names[0] == "proc00-64/shard.00000.mds" and names[-1].startswith("proc01-64/")
    assert_same(read_all(str(tmp_path / "book")), data)


def test_bad_samples_and_columns_are_refused_and_leave_no_data(tmp_path):
    with pytest.raises(ValueError, match="pkl"):
        MDSWriter(out=str(tmp_path / "p"), columns={"x": "pkl"})
    with pytest.raises(ValueError, match="ndarray:uint32: got an array of int64"):
        with MDSWriter(out=str(tmp_path / "d"), columns={"x": "ndarray:uint32"},
                       size_limit=64) as w:
            for k in range(5):
                w.write({"x": np.arange(8, dtype=np.uint32)})  # shards are written on the way
            w.write({"x": np.arange(8)})
    assert os.listdir(tmp_path / "d") == []  # no shards, no index.json: no data set


# ---------------------------------------------------------------------------------------------
# Cross-check against mosaicml-streaming
# ---------------------------------------------------------------------------------------------
def _files(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(directory) for f in fs}


def test_the_bytes_are_mosaicml_streamings(tmp_path):
    streaming = import_streaming()
    from streaming.base.compression import decompress
    from streaming.base.util import merge_index as streaming_merge_index

    data = samples(12, seed=3)
    for who, writer, merge in (("ours", MDSWriter, merge_index),
                               ("theirs", streaming.MDSWriter, streaming_merge_index)):
        for compression in (None, "zstd"):
            root = tmp_path / who / str(compression)
            for part, chunk in (("proc00-64", data[:7]), ("proc01-64", data[7:])):
                with writer(out=str(root / part), columns=COLUMNS,
                            compression=compression, size_limit=1 << 11) as w:
                    for s in chunk:
                        w.write(s)
            merge([str(root / p / "index.json") if who == "theirs" else str(root / p)
                   for p in ("proc00-64", "proc01-64")], str(root))
    ours, theirs = _files(tmp_path / "ours" / "None"), _files(tmp_path / "theirs" / "None")
    assert sorted(ours) == sorted(theirs) and len(ours) > 6
    for name in ours:
        assert ours[name] == theirs[name], name  # shards, part indexes, the merged index
    # zstd: streaming decompresses our shards to its own raw bytes; the indexes agree but for
    # the compressed sizes (another zstd binding)
    ours, theirs = _files(tmp_path / "ours" / "zstd"), _files(tmp_path / "theirs" / "zstd")
    assert sorted(ours) == sorted(theirs)
    for name in (n for n in ours if n.endswith(".zstd")):
        assert decompress("zstd", ours[name]) == decompress("zstd", theirs[name]), name
    strip = lambda index: [{**s, "zip_data": {**s["zip_data"], "bytes": 0}}  # noqa: E731
                           for s in json.loads(index)["shards"]]
    assert strip(ours["index.json"]) == strip(theirs["index.json"])
