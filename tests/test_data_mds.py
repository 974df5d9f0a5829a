import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.mds import MDSFormatError
from megatron_prolong.data.mds_import import import_mds
from megatron_prolong.data.mixture import build_pretraining_dataset
from test_data_helpers import import_streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_samples(rng, n, L, domain, sft=False):
    out = []
    for _ in range(n):
        ids = rng.integers(0, 128256, L).astype(np.uint32)
        cuts = np.sort(rng.choice(np.arange(1, L), 2, replace=False))
        spans = np.array([[0, cuts[0]], [cuts[0], cuts[1]], [cuts[1], L]], dtype=np.uint32)
        s = {"input_ids": ids, "indices": spans, "domain": domain}
        if sft:
            s["mask"] = (rng.random(L) < 0.5).astype(np.uint8)
        out.append(s)
    return out


def write_mds(out, samples, sft=False, compression=None, size_limit=1 << 12):
    MDSWriter = import_streaming().MDSWriter
    cols = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str"}
    if sft:
        cols["mask"] = "ndarray:uint8"
    with MDSWriter(out=str(out), columns=cols, compression=compression,
                   size_limit=size_limit) as w:
        for s in samples:
            w.write(s)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_import_keeps_domains_and_document_spans(tmp_path, compression):
    rng = np.random.default_rng(0)
    code = make_samples(rng, 6, 300, "thestackv1_concat_by_repo-65536")
    web = make_samples(rng, 5, 200, "fineweb-edu")
    mixed = [s for pair in zip(code, web) for s in pair] + code[5:]
    write_mds(tmp_path / "mds" / "part0", mixed, compression=compression)
    stats = import_mds(str(tmp_path / "mds"), str(tmp_path / "out"))
    assert stats["fineweb-edu"]["samples"] == 5 and stats["fineweb-edu"]["documents"] == 15
    for name, samples in [("thestackv1_concat_by_repo-65536", code), ("fineweb-edu", web)]:
        store = DocumentStore(str(tmp_path / "out" / name))
        docs = [store.tokens(i).tolist() for i in range(len(store))]
        expected = [s["input_ids"][a:b].tolist() for s in samples for a, b in s["indices"]]
        assert docs == expected  # exact ids and exact document boundaries
    mix = yaml.safe_load(open(tmp_path / "out" / "mixture.yaml"))
    shares = {d["name"]: d["proportion"] for d in mix["domains"]}
    assert shares == pytest.approx({"fineweb-edu": 1000 / 2800,
                                    "thestackv1_concat_by_repo-65536": 1800 / 2800}, abs=1e-5)


def test_import_sft_mask_and_train_on_it(tmp_path):
    rng = np.random.default_rng(1)
    samples = make_samples(rng, 4, 64, "tulu", sft=True)
    write_mds(tmp_path / "mds", samples, sft=True)
    import_mds(str(tmp_path / "mds"), str(tmp_path / "out"))
    store = DocumentStore(str(tmp_path / "out" / "tulu"))
    assert store.mask(0).tolist() == samples[0]["mask"][:samples[0]["indices"][0][1]].tolist()
    cfg = DataConfig(tokenizer_kind="byte", check_token_ids=False,
                     domains=[DomainConfig("tulu", [str(tmp_path / "out" / "tulu")], 1.0)])
    ds = build_pretraining_dataset(cfg, 128, mode="sft")
    assert ds[0].seq_length == 128 and ds[0].domain == "tulu"


def test_import_rejects_out_of_vocab_and_cli(tmp_path):
    rng = np.random.default_rng(2)
    write_mds(tmp_path / "mds", make_samples(rng, 2, 50, "books"))
    with pytest.raises(MDSFormatError, match="outside the vocabulary of 1000"):
        import_mds(str(tmp_path / "mds"), str(tmp_path / "bad"), vocab_size=1000)
    assert not os.path.exists(tmp_path / "bad" / "books.bin")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "import_prolong_mds.py"),
                        "--input", str(tmp_path / "mds"), "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "books: 2 samples, 6 documents, 100 tokens" in r.stdout
