import json
import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_prolong.data.chat import render_chat
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.preprocess import PreprocessConfig, preprocess
from megatron_prolong.data.readers import BadRecordError
from megatron_prolong.data.tokenizer import build_tokenizer
from test_data_helpers import write_jsonl
from tool_modules import load_tool

TOK = build_tokenizer("byte")
EOD = TOK.eos_id


def run(tmp_path, inputs, **kw):
    cfg = PreprocessConfig(inputs=inputs, output_prefix=str(tmp_path / "out"), progress=False,
                           **kw)
    return preprocess(cfg), str(tmp_path / "out")


def test_jsonl_gz_zst_to_indexed_dataset(tmp_path):
    texts = [f"document number {i} " * (i + 1) for i in range(30)]
    files = [write_jsonl(str(tmp_path / f"a{ext}"), [{"body": t} for t in texts[k::3]])
             for k, ext in enumerate([".jsonl", ".jsonl.gz", ".jsonl.zst"])]
    stats, prefix = run(tmp_path, files, text_key="body")
    ds = IndexedDataset(prefix)  # megatron-core's own reader
    expected = [t for k in range(3) for t in texts[k::3]]
    assert len(ds) == 30 and stats["docs_kept"] == 30
    for i, t in enumerate(expected):
        assert ds[i].tolist() == list(t.encode()) + [EOD]
    assert stats["tokens_kept"] == sum(len(t) + 1 for t in texts)
    on_disk = json.load(open(prefix + ".stats.json"))
    assert on_disk["docs_kept"] == 30 and sum(on_disk["length_histogram"].values()) == 30
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_workers_give_identical_output(tmp_path):
    f = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": f"x{i} " * (i % 50 + 1)}
                                                 for i in range(2000)])
    os.makedirs(tmp_path / "w1")
    os.makedirs(tmp_path / "w2")
    _, p1 = run(tmp_path / "w1", [f], workers=1, batch_size=64)
    _, p2 = run(tmp_path / "w2", [f], workers=2, batch_size=64)
    for ext in (".bin", ".idx"):
        assert open(p1 + ext, "rb").read() == open(p2 + ext, "rb").read()


def test_min_length_empty_docs_and_stats(tmp_path):
    recs = [{"text": "a" * 100}, {"text": "   "}, {"text": "b" * 10}, {"text": "c" * 60}]
    stats, prefix = run(tmp_path, [write_jsonl(str(tmp_path / "i.jsonl"), recs)],
                        min_doc_length=50)
    assert stats["docs_kept"] == 2 and stats["dropped"] == {"empty": 1, "too_short": 1}
    assert DocumentStore(prefix).lengths.tolist() == [101, 61]


def test_group_by_key_concatenates_in_stable_order(tmp_path):
    recs = [{"repo": "r2", "path": "b.py", "text": "B2"},
            {"repo": "r1", "path": "z.py", "text": "Z1"},
            {"repo": "r2", "path": "a.py", "text": "A2"},
            {"repo": "r1", "path": "a.py", "text": "A1"},
            {"repo": "r3", "path": "x.py", "text": "tiny"}]
    f = write_jsonl(str(tmp_path / "i.jsonl"), recs)
    stats, prefix = run(tmp_path, [f], group_key="repo", group_separator="|")
    ds = DocumentStore(prefix)
    docs = [TOK.decode(ds.tokens(i).tolist()) for i in range(len(ds))]
    assert docs == ["B2|A2<|end_of_text|>", "Z1|A1<|end_of_text|>", "tiny<|end_of_text|>"]
    assert stats["groups"] == 3
    _, prefix = run(tmp_path, [f], group_key="repo", group_sort_key="path",
                    group_separator="|", min_doc_length=6)
    ds = DocumentStore(prefix)
    assert [TOK.decode(ds.tokens(i).tolist()) for i in range(len(ds))] == [
        "A2|B2<|end_of_text|>", "A1|Z1<|end_of_text|>"]


def test_bad_lines_name_file_and_line(tmp_path):
    f = write_jsonl(str(tmp_path / "bad.jsonl"), [{"text": "ok"}] * 3,
                    raw_lines=['{"text": "fine"}', '{"text": broken', '["not", "object"]',
                               '{"other": 1}'])
    with pytest.raises(BadRecordError, match=r"bad.jsonl:5: malformed JSON"):
        run(tmp_path, [f])
    assert not os.path.exists(str(tmp_path / "out.bin"))  # nothing half-written left
    assert not [x for x in os.listdir(tmp_path) if ".tmp" in x]
    stats, _ = run(tmp_path, [f], skip_bad_lines=True)
    assert stats["docs_kept"] == 4 and stats["dropped"] == {"bad_record": 3}


def test_missing_field_error_names_line(tmp_path):
    f = write_jsonl(str(tmp_path / "i.jsonl"), [{"text": "a"}, {"content": "b"}])
    with pytest.raises(BadRecordError, match=r"i.jsonl:2: no field 'text'"):
        run(tmp_path, [f])


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", "three"]}), str(tmp_path / "t.parquet"))
    _, prefix = run(tmp_path, [str(tmp_path / "t.parquet")])
    assert DocumentStore(prefix).lengths.tolist() == [4, 4, 6]


def test_sft_preprocess_writes_assistant_mask(tmp_path):
    conv = {"messages": [{"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": " Hello. "}]}
    f = write_jsonl(str(tmp_path / "c.jsonl"), [conv, {"messages": [{"role": "user",
                                                                      "content": "x"}]}])
    stats, prefix = run(tmp_path, [f], sft=True, skip_bad_lines=True)
    assert stats["docs_kept"] == 1 and stats["dropped"] == {"bad_record": 1}
    ds = DocumentStore(prefix)
    ids, mask = ds.tokens(0), ds.mask(0)
    ref_ids, ref_mask = render_chat(TOK, conv["messages"])
    assert ids.tolist() == ref_ids.tolist() and mask.tolist() == ref_mask.tolist()
    assert TOK.decode(ids[mask == 1].tolist()) == "Hello.<|eot_id|>"


def test_cli_main_and_error_exit(tmp_path, capsys):
    cli = load_tool("preprocess_data")
    f = write_jsonl(str(tmp_path / "i.jsonl"), [{"t": "hello"}], raw_lines=["{bad"])
    out = str(tmp_path / "o")
    assert cli.main(["--input", f, "--output-prefix", out, "--tokenizer", "byte",
                     "--text-key", "t", "--quiet"]) == 2
    assert "i.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert cli.main(["--input", f, "--output-prefix", out, "--tokenizer", "byte",
                     "--text-key", "t", "--quiet", "--skip-bad-lines", "--add-bos"]) == 0
    assert DocumentStore(out).tokens(0).tolist() == [256] + list(b"hello") + [257]


def test_cli_paths_that_cannot_be_used_are_one_line(tmp_path, capsys):
    cli = load_tool("preprocess_data")
    f = write_jsonl(str(tmp_path / "i.jsonl"), [{"text": "hello"}])
    (tmp_path / "a_file").write_text("")
    for args in (["--input", f, "--output-prefix", str(tmp_path / "a_file" / "o")],
                 ["--input-list", str(tmp_path), "--output-prefix", str(tmp_path / "o")]):
        assert cli.main(args + ["--tokenizer", "byte", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
