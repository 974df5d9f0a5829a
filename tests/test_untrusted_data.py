"""Files on disk are untrusted input (issue 19, data side): names in an index stay inside their
folder, a compressed shard expands to at most what its index records, a hostile JSON line is a
bad line, and preprocessing leaves neither temporaries on a full disk nor a half-replaced output,
nor lets two runs share an output prefix."""
import errno
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import zstandard

from megatron_prolong.data import indexed, preprocess
from megatron_prolong.data.mds import MDSFormatError, iter_shard, read_index
from test_data_helpers import write_jsonl
from tool_modules import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = load_tool("preprocess_data")


# ---------------------------------------------------------------------------- MDS shards
def mds_shard(samples) -> bytes:
    """One MDS shard (the layout data/mds.py documents) with a single `input_ids`
    ndarray:uint32 column: header, offsets, writer config, samples."""
    blobs = []
    for ids in samples:
        ids = np.asarray(ids, dtype=np.uint32)
        column = bytes([1 << 2 | 2]) + struct.pack("<I", len(ids)) + ids.tobytes()  # 1-D, uint32 shape
        blobs.append(struct.pack("<I", len(column)) + column)
    config = b'{"version": 2}'
    first = 4 + 4 * (len(samples) + 1) + len(config)
    offsets = np.cumsum([first] + [len(b) for b in blobs]).astype(np.uint32)
    return struct.pack("<I", len(samples)) + offsets.tobytes() + config + b"".join(blobs)


def write_index(stream, raw_name, raw_bytes, samples, zip_name=None, zip_bytes=None):
    os.makedirs(stream, exist_ok=True)
    entry = {"format": "mds", "samples": samples, "column_names": ["input_ids"],
             "column_encodings": ["ndarray:uint32"], "column_sizes": [None],
             "raw_data": {"basename": raw_name, "bytes": raw_bytes, "hashes": {}},
             "zip_data": zip_name and {"basename": zip_name, "bytes": zip_bytes, "hashes": {}},
             "compression": "zstd" if zip_name else None, "hashes": [], "size_limit": 1 << 26,
             "version": 2}
    with open(os.path.join(stream, "index.json"), "w") as f:
        json.dump({"version": 2, "shards": [entry]}, f)


@pytest.mark.parametrize("name", ["../../x.mds", "ABSOLUTE", "/dev/zero"])
def test_mds_shard_names_outside_the_input_are_refused(tmp_path, name):
    # A valid shard outside --input: before the check, the import read it (or, for
    # /dev/zero, read forever).
    outside = tmp_path / "x.mds"
    outside.write_bytes(mds_shard([[1, 2, 3], [4, 5]]))
    name = str(outside) if name == "ABSOLUTE" else name
    stream = tmp_path / "in" / "domain"
    write_index(stream, name, None if name == "/dev/zero" else outside.stat().st_size, 2)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "import_prolong_mds.py"),
                        "--input", str(tmp_path / "in"), "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "index.json: shard entry 0" in errors[0] and repr(name) in errors[0]
    assert ("absolute path" if name.startswith("/") else "points outside") in errors[0]
    assert not out.exists() or not os.listdir(out)


def test_a_link_in_the_folder_to_a_device_is_refused(tmp_path):
    stream = tmp_path / "in"
    write_index(stream, "shard.00000.mds", None, 1)
    os.symlink("/dev/zero", stream / "shard.00000.mds")
    with pytest.raises(MDSFormatError, match="not a regular file"):
        read_index(str(stream))


def test_zstd_shard_is_decompressed_only_up_to_its_recorded_size(tmp_path):
    stream = tmp_path / "in"
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MiB of zeros, ~2 KB
    (stream).mkdir()
    (stream / "shard.00000.mds.zstd").write_bytes(bomb)
    write_index(stream, "shard.00000.mds", 1000, 1, "shard.00000.mds.zstd", len(bomb))
    (shard,) = read_index(str(stream))
    del bomb
    tracemalloc.start()
    try:
        with pytest.raises(MDSFormatError, match="decompresses to more than 1000 bytes"):
            list(iter_shard(shard))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated for a 1,000-byte shard"


def test_zstd_shard_of_the_recorded_size_still_reads(tmp_path):
    stream = tmp_path / "in"
    stream.mkdir()
    raw = mds_shard([[7, 8, 9]])
    packed = zstandard.ZstdCompressor().compress(raw)
    (stream / "s.mds.zstd").write_bytes(packed)
    write_index(stream, "s.mds", len(raw), 1, "s.mds.zstd", len(packed))
    (shard,) = read_index(str(stream))
    assert [s["input_ids"].tolist() for _, s in iter_shard(shard)] == [[7, 8, 9]]


# ------------------------------------------------------------------ HF safetensors index
@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "/dev/zero"])
def test_safetensors_index_naming_a_file_outside_the_directory_is_refused(tmp_path, name):
    import torch
    from safetensors.torch import save_file

    from megatron_prolong.convert.errors import ConversionError
    from megatron_prolong.convert.hf_io import SAFE_INDEX, HFCheckpoint

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    hf = tmp_path / "hf"
    hf.mkdir()
    name = str(outside) if name == "ABSOLUTE" else name
    (hf / SAFE_INDEX).write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ConversionError) as info:
        HFCheckpoint(str(hf))
    message = str(info.value)
    assert SAFE_INDEX in message and "weight 'w'" in message and repr(name) in message
    assert ("absolute path" if name.startswith("/") else "points outside") in message


# ----------------------------------------------------------------------------- preprocessing
def _run(*args):
    return PREPROCESS.main([*args, "--tokenizer", "byte", "--quiet"])


def _error_lines(err):
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_deeply_nested_json_line_is_a_bad_line(tmp_path, capsys):
    deep = "[" * 200_000 + "]" * 200_000
    f = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "one"}],
                    raw_lines=['{"text": ' + deep + "}", json.dumps({"text": "two"})])
    assert _run("--input", f, "--output-prefix", str(tmp_path / "o"), "--skip-bad-lines") == 0
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    assert stats["docs_kept"] == 2 and stats["dropped"] == {"bad_record": 1}
    capsys.readouterr()
    assert _run("--input", f, "--output-prefix", str(tmp_path / "p")) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"{f}:2: JSON nested too deeply" in line


class _FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes beyond it fail with ENOSPC."""

    def __init__(self, path, room):
        self._f, self._room, self.path = open(path, "wb", buffering=0), room, path

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        self._room -= len(data)
        return self._f.write(data)

    def close(self):
        self._f.close()
        super().close()


@pytest.mark.parametrize("mode", ["documents", "grouped"])
def test_full_disk_leaves_no_temporaries(tmp_path, monkeypatch, capsys, mode):
    import builtins

    def open_on_full_disk(path, mode="r", buffering=-1, *args, **kwargs):
        if "w" in mode and ".tmp-" in os.fspath(path):  # the outputs under construction
            return io.BufferedWriter(_FullDisk(path, room=4096), buffer_size=8192)
        return builtins.open(path, mode, buffering, *args, **kwargs)

    monkeypatch.setattr(indexed, "open", open_on_full_disk, raising=False)
    monkeypatch.setattr(preprocess, "open", open_on_full_disk, raising=False)
    f = write_jsonl(str(tmp_path / "a.jsonl"),
                    [{"text": "word " * 200, "g": i % 7} for i in range(300)])
    extra = ["--group-key", "g"] if mode == "grouped" else []
    assert _run("--input", f, "--output-prefix", str(tmp_path / "o"), *extra) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "No space left on device" in line
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "o.lock"]


def test_failed_rerun_keeps_the_previous_complete_output(tmp_path, capsys):
    good = write_jsonl(str(tmp_path / "good.jsonl"), [{"text": f"doc {i}"} for i in range(300)])
    prefix = str(tmp_path / "o")
    assert _run("--input", good, "--output-prefix", prefix) == 0
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx", ".done", ".stats.json")}
    records = [{"text": f"doc {i}"} for i in range(180)] + [{"body": "no text key"}]
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), records)
    capsys.readouterr()
    assert _run("--input", bad, "--output-prefix", prefix) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"{bad}:181: no field 'text'" in line and "--text-key" in line
    assert {s: open(prefix + s, "rb").read() for s in before} == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    # ... and the same command as before still finds it complete.
    assert _run("--input", good, "--output-prefix", prefix) == 0
    assert "skipped" in capsys.readouterr().out


def test_a_successful_rerun_replaces_outputs_the_new_one_lacks(tmp_path):
    chat = write_jsonl(str(tmp_path / "c.jsonl"), [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    text = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": "plain"}])
    prefix = str(tmp_path / "o")
    assert _run("--input", chat, "--output-prefix", prefix, "--sft") == 0
    assert os.path.exists(prefix + ".lossmask.idx")
    assert _run("--input", text, "--output-prefix", prefix) == 0
    # no stale mask beside the new pair (a reader would take it for this pair's mask)
    assert not os.path.exists(prefix + ".lossmask.idx")
    assert not os.path.exists(prefix + ".lossmask.bin")


def test_second_run_on_the_same_prefix_is_refused_while_the_first_runs(tmp_path):
    """The first run holds the prefix while it waits for its --input-list (a FIFO that the
    test writes only once the second run has been refused): a state, not a moment."""
    text = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": f"doc {i}"} for i in range(50)])
    fifo = str(tmp_path / "inputs.fifo")
    os.mkfifo(fifo)
    prefix = str(tmp_path / "o")
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--tokenizer",
           "byte", "--quiet", "--output-prefix", prefix]
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.Popen(cmd + ["--input-list", fifo], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        lock = prefix + ".lock"
        deadline = time.time() + 60
        while not (os.path.exists(lock) and f'"pid": {first.pid}' in open(lock).read()):
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)  # polling the state above, not waiting for a moment
        second = subprocess.run(cmd + ["--input", text], env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        (line,) = _error_lines(second.stderr)
        assert f"another preprocessing run writes this output prefix (pid {first.pid}" in line
        assert not os.path.exists(prefix + ".bin")
        writer = threading.Thread(target=lambda: open(fifo, "w").write(text + "\n"))
        writer.start()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
        assert len(indexed.read_index(prefix)[1]) == 50
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if writer is not None:
            writer.join(timeout=5)
