import os

import numpy as np
import pytest

from megatron_prolong.data.config import DataConfig, load_mixture
from megatron_prolong.data.demo_corpus import build_demo_corpus
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.mixture import build_pretraining_dataset

MIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                   "mixtures")


@pytest.mark.parametrize("name,long_share", [("prolong_stage1_64k.yaml", 0.60),
                                             ("prolong_stage2_512k.yaml", 0.60)])
def test_prolong_mixture_files(name, long_share):
    doms = load_mixture(os.path.join(MIX, name))
    assert sum(d.proportion for d in doms) == pytest.approx(1.0)
    assert sum(d.proportion for d in doms if d.mode == "long") == pytest.approx(long_share)
    short = {d.name: d.proportion for d in doms if d.mode == "short"}
    assert short == {"fineweb_edu": 0.10, "fineweb": 0.10, "stackexchange": 0.04,
                     "wikipedia": 0.04, "tulu_v2": 0.03, "arxiv": 0.03, "openwebmath": 0.03,
                     "textbooks": 0.03}
    cfg = DataConfig(mixture=os.path.join(MIX, name), variables={"PROLONG_DATA": "/data"})
    assert all(p.startswith("/data/") for d in cfg.resolved_domains() for p in d.paths)


def test_demo_corpus_is_deterministic_and_trainable(tmp_path):
    a = build_demo_corpus(str(tmp_path / "a"), seed=3, code_bytes=300_000, num_recall_docs=20)
    b = build_demo_corpus(str(tmp_path / "b"), seed=3, code_bytes=300_000, num_recall_docs=20)
    assert [d.name for d in a] == ["code", "recall", "text"]
    for da, db in zip(a, b):
        assert open(da.paths[0] + ".bin", "rb").read() == open(db.paths[0] + ".bin", "rb").read()
    code = DocumentStore(a[0].paths[0])
    assert code.lengths.sum() >= 300_000 and len(code) >= 2
    recall = DocumentStore(a[1].paths[0])
    text = bytes(recall.tokens(0)[1:-1].astype(np.uint8)).decode()
    pairs = dict(line.split(": ") for line in text.split("Now recall them.")[0].splitlines()[1:])
    queries = dict(line.split(" -> ") for line in text.split("Now recall them.")[1].splitlines() if line)
    assert len(pairs) == 200 and all(pairs[k] == v for k, v in queries.items())
    ds = build_pretraining_dataset(DataConfig(domains=a), 2048, mode="short")
    assert {ds[i].domain for i in range(10)} == {"code", "recall", "text"}


def test_demo_corpus_reports_what_it_builds_and_how_far(tmp_path):
    lines = []
    domains = build_demo_corpus(str(tmp_path), code_bytes=100_000, num_recall_docs=5,
                                recall_pairs=10, progress=lines.append)
    assert len(lines) == 4 and lines[0].startswith(f"demo corpus: building {tmp_path}: code, "
                                                   "recall, text")
    for k, d in enumerate(domains):
        store = DocumentStore(d.paths[0])
        assert lines[k + 1] == (f"demo corpus: {d.name}: {len(store):,} documents, "
                                f"{int(store.lengths.sum()):,} tokens [{k + 1}/3]")
