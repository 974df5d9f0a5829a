"""Held-out validation documents: chosen deterministically per domain, never in a training
batch, and the only documents in the validation rows (mixture YAML over indexed datasets, as
runs configure it; also separate validation datasets)."""
import numpy as np
import pytest
import yaml

from megatron_prolong.config import load_config
from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.heldout import HeldOutSpec, heldout_documents
from megatron_prolong.data.mixture import build_pretraining_dataset
from megatron_prolong.training.data_source import build_validation_samples, heldout_spec
from test_data_helpers import write_docs

L = 64


def tagged(lengths, first_tag):
    """Document i is `lengths[i]` copies of token first_tag + i: every token names its doc."""
    return [np.full(n, first_tag + i) for i, n in enumerate(lengths)]


def tags(samples):
    return {int(t) for s in samples for t in s.tokens[s.loss_mask > 0]}


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    long_lengths = rng.integers(20, 200, 40)  # long mode keeps those >= 64
    short_lengths = rng.integers(5, 30, 60)
    write_docs(str(tmp_path / "long"), tagged(long_lengths, 10))
    write_docs(str(tmp_path / "short"), tagged(short_lengths, 100))
    write_docs(str(tmp_path / "val"), tagged([80] * 5, 200))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(yaml.safe_dump({"domains": [
        {"name": "books", "paths": [str(tmp_path / "long")], "proportion": 0.5, "mode": "long"},
        {"name": "web", "paths": [str(tmp_path / "short")], "proportion": 0.5, "mode": "short"}]}))
    (tmp_path / "val.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "books", "paths": [str(tmp_path / "val")], "proportion": 1.0, "mode": "long"}]}))
    return tmp_path, long_lengths, short_lengths


def test_choice_is_deterministic_counted_and_only_among_kept_documents():
    lengths = np.array([10, 100, 70, 5, 300, 64, 63, 90])
    spec = HeldOutSpec(docs=2, seed=3)
    held = heldout_documents(lengths, "books", 64, spec)
    assert held.tolist() == heldout_documents(lengths, "books", 64, spec).tolist()
    assert len(held) == 2 and all(lengths[held] >= 64)
    assert len(heldout_documents(lengths, "books", 64, HeldOutSpec(fraction=0.5))) == 3  # of 5
    assert len(heldout_documents(lengths, "books", 64, HeldOutSpec(docs=99))) == 4  # one trains
    assert len(heldout_documents(lengths, "books", 64, HeldOutSpec())) == 0
    other = {tuple(heldout_documents(np.full(50, 100), n, 1, HeldOutSpec(docs=5)))
             for n in ("a", "b", "c")}
    assert len(other) == 3  # each domain draws its own


def test_training_never_sees_a_heldout_document(corpus):
    tmp_path, long_lengths, short_lengths = corpus
    spec = HeldOutSpec(docs=3, fraction=0.05, seed=1)
    cfg = DataConfig(mixture=str(tmp_path / "mix.yaml"), heldout=spec)
    data = build_pretraining_dataset(cfg, L, seed=5)
    held = {10 + i for i in heldout_documents(long_lengths, "books", L, spec)}
    held |= {100 + i for i in heldout_documents(short_lengths, "web", 1, spec)}
    assert len(held) == 3 + 3
    seen = tags([data[i] for i in range(600)])  # several epochs of both domains
    assert not seen & held
    kept_long = {10 + i for i, n in enumerate(long_lengths) if n >= L} - held
    kept_short = {100 + i for i in range(len(short_lengths))} - held
    assert kept_long | kept_short <= seen  # everything else is trained on


def test_validation_rows_come_from_the_heldout_documents_of_each_domain(corpus):
    tmp_path, long_lengths, short_lengths = corpus
    cfg = load_config(None, ["data.kind=mixture", f"data.mixture={tmp_path / 'mix.yaml'}",
                             f"training.seq_length={L}", "evaluation.heldout_docs=3",
                             "evaluation.validation_rows=4"])
    spec = heldout_spec(cfg)
    data_cfg = DataConfig(mixture=str(tmp_path / "mix.yaml"), heldout=spec)
    samples = build_validation_samples(cfg, data_cfg)
    again = build_validation_samples(cfg, data_cfg)  # the same rows every time
    assert all((a.tokens == b.tokens).all() and a.domain == b.domain
               for a, b in zip(samples, again, strict=True))
    books = [s for s in samples if s.domain == "books"]
    web = [s for s in samples if s.domain == "web"]
    assert 1 <= len(books) <= 4 and 1 <= len(web) <= 4
    assert tags(books) <= {10 + i for i in heldout_documents(long_lengths, "books", L, spec)}
    assert tags(web) <= {100 + i for i in heldout_documents(short_lengths, "web", 1, spec)}
    # separate validation datasets: no carving, rows from those datasets only
    cfg = load_config(None, ["data.kind=mixture", f"data.mixture={tmp_path / 'mix.yaml'}",
                             f"training.seq_length={L}",
                             f"evaluation.validation_mixture={tmp_path / 'val.yaml'}"])
    assert heldout_spec(cfg) is None
    samples = build_validation_samples(cfg, None)
    assert {s.domain for s in samples} == {"books"} and tags(samples) <= set(range(200, 205))


def test_demo_domains_carry_the_spec():
    cfg = load_config("examples/demo_cpu.yaml")
    assert heldout_spec(cfg) == HeldOutSpec(2, 0.0, cfg.evaluation.heldout_seed)
    dom = DomainConfig("x", ["p"], 1.0)
    assert DataConfig(domains=[dom], heldout={"docs": 2}).heldout == HeldOutSpec(docs=2)
