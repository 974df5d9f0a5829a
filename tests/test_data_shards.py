"""Sharded preprocessing + merge: byte-identical to one process, groups never split, resumable."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.tokenizer import build_tokenizer
from test_data_helpers import write_jsonl
from tool_modules import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = build_tokenizer("byte")
COUNTED = ("files", "records_read", "docs_kept", "tokens_kept", "dropped", "length_histogram",
           "groups", "tokenize_tokens")


PREPROCESS, MERGE = load_tool("preprocess_data"), load_tool("merge_datasets")


def _bytes(prefix, ext):
    with open(prefix + ext, "rb") as f:
        return f.read()


def _same_dataset(a, b, exts=(".bin", ".idx")):
    for ext in exts:
        assert _bytes(a, ext) == _bytes(b, ext), ext
    sa, sb = (json.load(open(p + ".stats.json")) for p in (a, b))
    assert {k: sa[k] for k in COUNTED} == {k: sb[k] for k in COUNTED}


def _run_sharded(args, prefix, n):
    for i in range(n):
        assert PREPROCESS.main(args + ["--output-prefix", prefix, "--shard", f"{i}/{n}"]) == 0
    assert MERGE.main(["--shards-of", prefix]) == 0


def _corpus(tmp_path, n_files=5):
    rng = np.random.default_rng(0)
    files = []
    for k in range(n_files):  # uneven file sizes, one compressed, one bad line, one empty text
        recs = [{"text": "doc %d.%d " % (k, i) * int(rng.integers(1, 40))}
                for i in range(int(rng.integers(5, 60)))]
        recs.append({"text": "  "})
        files.append(write_jsonl(str(tmp_path / f"part{k}.jsonl") + (".gz" if k == 1 else ""),
                                 recs, raw_lines=['{"text": broken'] if k == 3 else ()))
    return files


def test_merged_shards_equal_one_process_bytes(tmp_path):
    files = _corpus(tmp_path)
    args = ["--input", *files, "--tokenizer", "byte", "--quiet", "--skip-bad-lines",
            "--min-doc-length", "30"]
    assert PREPROCESS.main(args + ["--output-prefix", str(tmp_path / "single")]) == 0
    for n in (3, 7):  # 7 shards > 5 files: some shards are empty
        _run_sharded(args, str(tmp_path / f"sharded{n}"), n)
        _same_dataset(str(tmp_path / "single"), str(tmp_path / f"sharded{n}"))
    owned = [json.load(open(str(tmp_path / f"sharded7.shard-{i:05d}-of-00007.stats.json")))
             ["shard"]["files_read"] for i in range(7)]
    assert sum(owned) == 5 and 0 in owned


def test_sft_shards_merge_loss_masks(tmp_path):
    conv = [{"messages": [{"role": "user", "content": f"question {i}?" * (i % 5 + 1)},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(30)]
    files = [write_jsonl(str(tmp_path / f"c{k}.jsonl"), conv[k::3]) for k in range(3)]
    args = ["--input", *files, "--tokenizer", "byte", "--quiet", "--sft"]
    assert PREPROCESS.main(args + ["--output-prefix", str(tmp_path / "single")]) == 0
    _run_sharded(args, str(tmp_path / "merged"), 2)
    _same_dataset(str(tmp_path / "single"), str(tmp_path / "merged"))
    for ext in (".bin", ".idx"):
        assert _bytes(str(tmp_path / "single.lossmask"), ext) == \
            _bytes(str(tmp_path / "merged.lossmask"), ext)
    assert DocumentStore(str(tmp_path / "merged")).has_mask


def test_groups_spanning_files_stay_whole(tmp_path):
    """A repository's files are spread over several inputs (as in The Stack's per-language
    files); every shard must hold whole repositories and the merge must restore the order."""
    rng = np.random.default_rng(1)
    recs = [{"repo": f"r{int(rng.integers(0, 25))}", "chunk": int(rng.integers(0, 30)),
             "text": "x" * int(rng.integers(1, 30))} for _ in range(400)]
    for r in recs:
        r["text"] = f"[{r['repo']}#{r['chunk']}]" + r["text"]
    files = [write_jsonl(str(tmp_path / f"f{k}.jsonl"), recs[k::4]) for k in range(4)]
    args = ["--input", *files, "--tokenizer", "byte", "--quiet", "--group-key", "repo",
            "--group-sort-key", "chunk", "--group-separator", "|", "--min-doc-length", "60"]
    assert PREPROCESS.main(args + ["--output-prefix", str(tmp_path / "single")]) == 0
    _run_sharded(args, str(tmp_path / "merged"), 3)
    _same_dataset(str(tmp_path / "single"), str(tmp_path / "merged"))

    def repos_of(prefix):
        ds = DocumentStore(prefix)
        out = []
        for i in range(len(ds)):
            parts = TOK.decode(ds.tokens(i)[:-1].tolist()).split("|")  # without EOD
            names = {p[1:p.index("#")] for p in parts}
            assert len(names) == 1  # one repository per document
            chunks = [int(p[p.index("#") + 1:p.index("]")]) for p in parts]
            assert chunks == sorted(chunks)  # integers sorted numerically
            out.append(names.pop())
        return out

    per_shard = [repos_of(str(tmp_path / f"merged.shard-{i:05d}-of-00003")) for i in range(3)]
    seen = [r for shard in per_shard for r in shard]
    assert len(seen) == len(set(seen)) and all(per_shard)  # no repository in two shards
    whole = repos_of(str(tmp_path / "single"))
    assert sorted(seen) == sorted(whole)
    for shard in per_shard:  # each repository holds all its records: same length as single
        single = DocumentStore(str(tmp_path / "single"))
        for r in shard:
            expected = sum(len(x["text"]) + 1 for x in recs if x["repo"] == r)
            assert single.lengths[whole.index(r)] == expected


def _shard_cmd(files, prefix, shard):
    return [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", *files,
            "--output-prefix", prefix, "--tokenizer", "byte", "--quiet", "--shard", shard]


@pytest.mark.slow
def test_killed_shard_is_redone_and_complete_one_skipped(tmp_path):
    text = "resume me " * 2000
    files = [write_jsonl(str(tmp_path / f"big{k}.jsonl"), [{"text": f"{k}.{i} {text}"}
                                                     for i in range(800)]) for k in range(2)]
    prefix = str(tmp_path / "out")
    shard0 = prefix + ".shard-00000-of-00002"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(_shard_cmd(files, prefix, "0/2"), env=env)
    deadline = time.time() + 600  # bounds a hang only; the loop ends on the file's size
    tmp_bin = None
    while time.time() < deadline and proc.poll() is None:  # kill it while the .bin grows
        tmp_bin = next((os.path.join(tmp_path, f) for f in os.listdir(tmp_path)
                        if f.startswith("out.shard-00000-of-00002.tmp-") and f.endswith(".bin")),
                       None)
        if tmp_bin and os.path.getsize(tmp_bin) > 1 << 20:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_bin and os.path.getsize(tmp_bin) > 0, "the shard finished before it was killed"
    assert not os.path.exists(shard0 + ".bin") and not os.path.exists(shard0 + ".done")
    subprocess.run(_shard_cmd(files, prefix, "1/2"), env=env, check=True)
    merge = [sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"), "--shards-of",
             prefix]
    refused = subprocess.run(merge, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "(index 0)" in refused.stderr
    assert not os.path.exists(prefix + ".bin")

    subprocess.run(_shard_cmd(files, prefix, "0/2"), env=env, check=True)  # redone
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # the killed run's leftovers
    mtime = os.stat(shard0 + ".bin").st_mtime_ns
    again = subprocess.run(_shard_cmd(files, prefix, "0/2"), env=env, capture_output=True,
                           text=True, check=True)
    assert "skipped" in again.stdout and os.stat(shard0 + ".bin").st_mtime_ns == mtime
    subprocess.run(merge, env=env, check=True)
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input",
                    *files, "--output-prefix", str(tmp_path / "single"), "--tokenizer", "byte",
                    "--quiet"], env=env, check=True)
    _same_dataset(str(tmp_path / "single"), prefix)

    with open(files[1], "a") as f:  # an input changed: the shard that reads it is redone
        f.write(json.dumps({"text": "late addition"}) + "\n")
    redo = subprocess.run(_shard_cmd(files, prefix, "1/2"), env=env, capture_output=True,
                          text=True, check=True)
    assert "skipped" not in redo.stdout


def test_merge_refuses_shards_of_different_runs(tmp_path, capsys):
    files = _corpus(tmp_path, 3)
    base = ["--input", *files, "--tokenizer", "byte", "--quiet", "--skip-bad-lines",
            "--output-prefix", str(tmp_path / "o")]
    assert PREPROCESS.main(base + ["--shard", "0/2"]) == 0
    assert PREPROCESS.main(base + ["--shard", "1/2", "--min-doc-length", "5"]) == 0
    assert MERGE.main(["--shards-of", str(tmp_path / "o")]) == 2
    assert "different preprocessing runs" in capsys.readouterr().err
    assert PREPROCESS.main(base + ["--shard", "1/2"]) == 0  # redone with the same options
    assert MERGE.main(["--shards-of", str(tmp_path / "o"), "--remove-shards"]) == 0
    assert not [f for f in os.listdir(tmp_path) if ".shard-" in f]
    assert MERGE.main(["--shards-of", str(tmp_path / "o")]) == 0  # already merged: skipped
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["3", "2/2", "-1/4", "a/b"])
def test_bad_shard_spec_is_a_usage_error(tmp_path, bad, capsys):
    f = write_jsonl(str(tmp_path / "i.jsonl"), [{"text": "x"}])
    assert PREPROCESS.main(["--input", f, "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer", "byte", f"--shard={bad}"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_merge_any_datasets_in_order_and_refuse_mixed_kinds(tmp_path, capsys):
    a = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": f"alpha {i}"} for i in range(3)])
    b = write_jsonl(str(tmp_path / "b.jsonl"), [{"text": f"beta {i}"} for i in range(2)])
    chat = write_jsonl(str(tmp_path / "c.jsonl"), [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    for src, out, extra in ((a, "A", []), (b, "B", []), (chat, "C", ["--sft"])):
        assert PREPROCESS.main(["--input", src, "--output-prefix", str(tmp_path / out),
                                "--tokenizer", "byte", "--quiet", *extra]) == 0
    assert MERGE.main(["--input", str(tmp_path / "A"), str(tmp_path / "B"),
                       "--output-prefix", str(tmp_path / "AB")]) == 0
    ab = DocumentStore(str(tmp_path / "AB"))
    assert [TOK.decode(ab.tokens(i)[:-1].tolist()) for i in range(len(ab))] == \
        [f"alpha {i}" for i in range(3)] + [f"beta {i}" for i in range(2)]
    assert json.load(open(str(tmp_path / "AB.stats.json")))["docs_kept"] == 5
    assert MERGE.main(["--input", str(tmp_path / "A"), str(tmp_path / "C"),
                       "--output-prefix", str(tmp_path / "AC")]) == 2
    assert "loss mask" in capsys.readouterr().err and not os.path.exists(str(tmp_path / "AC.bin"))
