"""The miniature experiment's corpus: the demo corpus' domains, split into training and
validation data once and shared by every arm and seed.

    python examples/miniature/corpus.py OUT_DIR

writes indexed datasets (byte tokenizer) that the mixture YAMLs of this folder read through
${MINIATURE_CORPUS}:

  train/code          the standard library's source concatenated per package (data/demo_corpus),
                      packages held out for validation removed
  train/text          their docstrings: short prose documents (80-2,000 bytes)
  train/recall_short  key/value recall documents of 4-12 pairs (under 512 tokens): the recall
                      skill at the pre-training length
  train/recall_long   recall documents of 110-220 pairs (4.4K-8.8K tokens): long data
  val/code            held-out packages cut into documents of exactly VAL_TOKENS tokens
  val/recall          recall documents from another generator, cut to exactly VAL_TOKENS
  val/text            the held-out packages' docstrings

Validation documents are exactly VAL_TOKENS long so that each validation row at that length is
one document from its start: "position p" is then the position in the document for every arm.
Deterministic (fixed seeds, the running Python's own standard library); a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from megatron_prolong.data.demo_corpus import docstrings, recall_document, stdlib_repos
from megatron_prolong.data.indexed import IndexedWriter
from megatron_prolong.data.tokenizer import ByteTokenizer

VAL_TOKENS = 4096
CODE_BYTES = 5_000_000
SKIPPED = ("encodings",)    # codec tables, not code (1.4 MB of them)
HELD_OUT_EVERY = 6          # every 6th package of at least MIN_VAL_PACKAGE bytes is held out
MIN_VAL_PACKAGE = 20_000
CORPUS_SEED = 0             # the corpus is the same for every training seed


def split_packages(repos: list[tuple[str, str]]) -> tuple[list, list]:
    """(training packages, held-out packages): every HELD_OUT_EVERY-th large one held out."""
    large = [name for name, text in repos if len(text) >= MIN_VAL_PACKAGE]
    held = set(large[HELD_OUT_EVERY - 1::HELD_OUT_EVERY])
    return ([r for r in repos if r[0] not in held], [r for r in repos if r[0] in held])


def _pieces(text: str, tokens: int) -> list[str]:
    """Consecutive pieces of `text` of `tokens` - 2 bytes (BOS and EOD complete a document)."""
    width = tokens - 2
    data = text.encode("utf-8", errors="replace")
    return [data[i:i + width].decode("utf-8", errors="replace")
            for i in range(0, len(data) - width + 1, width)]


def build(out_dir: str, num_recall_short: int = 3000, num_recall_long: int = 160,
          num_recall_val: int = 24) -> dict:
    tok = ByteTokenizer()
    eod = np.array([tok.eos_id], dtype=np.int32)
    counts: dict[str, dict] = {}

    def write(name: str, docs, exact: int = 0) -> None:
        prefix = os.path.join(out_dir, name)
        n = t = 0
        with IndexedWriter(prefix, tok.vocab_size) as w:
            for text in docs:
                ids = np.concatenate([[tok.bos_id], tok.encode_np(text), eod])
                if exact:  # byte pieces may decode to fewer bytes (a split character): pad
                    ids = ids[:exact] if len(ids) >= exact else np.concatenate(
                        [ids[:-1], np.full(exact - len(ids), ord(" ")), eod])
                w.add(ids)
                n, t = n + 1, t + len(ids)
        counts[name] = {"documents": n, "tokens": t}

    train, held = split_packages([r for r in stdlib_repos(CODE_BYTES) if r[0] not in SKIPPED])
    rng = np.random.default_rng(CORPUS_SEED)
    val_rng = np.random.default_rng(CORPUS_SEED + 1)
    write("train/code", (text for _, text in train))
    write("train/text", docstrings(train))
    write("train/recall_short", (recall_document(rng, int(rng.integers(4, 13)))
                                 for _ in range(num_recall_short)))
    write("train/recall_long", (recall_document(rng, int(rng.integers(110, 221)))
                                for _ in range(num_recall_long)))
    write("val/code", (p for _, text in held for p in _pieces(text, VAL_TOKENS)), VAL_TOKENS)
    write("val/recall", (_pieces(recall_document(val_rng, 110), VAL_TOKENS)[0]
                         for _ in range(num_recall_val)), VAL_TOKENS)
    write("val/text", docstrings(held))
    summary = {"held_out_packages": [name for name, _ in held], "datasets": counts}
    with open(os.path.join(out_dir, "corpus.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.out_dir, "corpus.json")):
        print(f"corpus: {args.out_dir} (already built)")
        return 0
    summary = build(args.out_dir)
    print(f"corpus: {args.out_dir}: held-out packages {', '.join(summary['held_out_packages'])}; "
          + ", ".join(f"{k} {v['documents']} docs / {v['tokens']:,} tokens"
                      for k, v in summary["datasets"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
