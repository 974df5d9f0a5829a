"""tools/inspect_data.py on the demo recipe, checked against the training loader itself."""
import json
import os

import numpy as np

from megatron_prolong.config import load_config, validate
from megatron_prolong.data.heldout import heldout_documents
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.streams import effective_min_doc_length
from megatron_prolong.training.data_source import build_data_source
from tool_modules import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "examples", "demo_cpu.yaml")


def _tool():
    return load_tool("inspect_data")


def test_inspect_demo_recipe_matches_the_loader(tmp_path, capsys):
    run_dir, report_path = str(tmp_path / "run"), str(tmp_path / "report.json")
    assert _tool().main([RECIPE, f"run_dir={run_dir}", "--steps", "10", "--max-epochs", "0.1",
                         "--json", report_path]) == 0
    out = capsys.readouterr().out
    report = json.load(open(report_path))

    # what the training loop would be fed, step by step
    cfg = load_config(RECIPE, [f"run_dir={run_dir}"])
    source = build_data_source(cfg, validate(cfg, 1), dp_rank=0)
    names = source.domain_names
    L = cfg.training.seq_length
    tokens = np.zeros(len(names))
    rows = np.zeros(len(names), dtype=np.int64)
    costs = []
    for step in range(cfg.training.total_steps()):
        batches = source.next_step()
        if step == 0:  # the rows the tool printed are the loader's first micro-batches
            assert [(r["domains"], r["cu_seqlens"]) for r in report["rows"]] == \
                [(b["domains"], b["cu_seqlens"].tolist()) for b in batches]
        for b in batches:
            for name in b["domains"]:
                rows[names.index(name)] += 1
            if step < 10:
                np.add.at(tokens, b["domain_ids"][0].numpy(), 1)
                lens = np.diff(b["cu_seqlens"].numpy().astype(np.int64))
                costs.append(float((lens ** 2).sum()) / L ** 2)

    shares = {s["domain"]: s for s in report["shares"]}
    for d, name in enumerate(names):
        assert abs(shares[name]["token_share"] - tokens[d] / tokens.sum()) < 1e-12
        assert abs(shares[name]["token_share"] - shares[name]["target"]) < 4 / tokens.sum() * L
    assert np.allclose(sorted(report["row_costs"]), sorted(costs))

    corpus = os.path.join(run_dir, "demo_corpus")
    epochs = {e["domain"]: e for e in report["epochs"]}
    domains = {dom.name: dom for dom in source.data_cfg.resolved_domains()}
    trained_docs = {}
    for d, name in enumerate(names):
        # an epoch is what training sees: the domain's documents less those held out for
        # validation (data/heldout.py)
        store = DocumentStore(os.path.join(corpus, name))
        held = heldout_documents(store.lengths, name, effective_min_doc_length(
            domains[name].mode or source.data_cfg.mode, domains[name].min_doc_length, L),
            source.data_cfg.heldout)
        per_epoch = int(store.lengths.sum() - store.lengths[held].sum())
        assert len(held) > 0
        trained_docs[name] = len(store) - len(held)
        assert epochs[name]["samples"] == rows[d]
        assert abs(epochs[name]["epochs"] - rows[d] * L / per_epoch) < 1e-9
    warned = sorted(n for n in names if epochs[n]["epochs"] > 0.1)
    assert warned and len(report["warnings"]) == len(warned)
    assert all(f"warning: domain {n!r} is repeated" in out for n in warned)

    hist = report["document_length_histogram"]["text"]  # the documents training draws from
    assert sum(c for _, _, c in hist) == trained_docs["text"]
    assert "|| doc 0 |" in out and "<|end_of_text|>" in out

    try:
        import matplotlib  # noqa: F401  (the optional `plots` extra)
    except ImportError:
        assert "charts skipped: matplotlib is not installed" in out
        return
    for name in ("document_lengths.png", "attention_cost.png"):
        with open(os.path.join(run_dir, "inspect", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_inspect_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    assert _tool().main([RECIPE, "training.global_batch_size=3", "--world-size", "2",
                         f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "global_batch_size" in err
