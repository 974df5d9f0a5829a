"""A small offline corpus for the CPU demo, tokenized with the byte tokenizer.

Domains (all deterministic for a seed):
  code   : the Python standard library's .py files concatenated per top-level package (one
           "repository" per document, files in sorted path order), capped at ``code_bytes``.
  recall : synthetic long documents: random "key: value" pairs, then the same keys queried in a
           shuffled order with their values. The answers can only be predicted by recalling the
           first part, so loss on them measures long-context use.
  text   : docstrings of the same sources, as short prose-like documents.
"""
from __future__ import annotations

import os
import re
import sysconfig
from typing import Callable, Optional

import numpy as np

from .config import DomainConfig
from .indexed import IndexedWriter
from .tokenizer import ByteTokenizer

_DOCSTRING = re.compile(r'"""(.{80,2000}?)"""', re.S)


def stdlib_repos(max_bytes: int) -> list[tuple[str, str]]:
    """(name, concatenated source) per top-level stdlib package, sorted by name, capped."""
    root = sysconfig.get_paths()["stdlib"]
    repos, total = [], 0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(("_", "test", "site-packages", "idlelib", "lib2to3")):
            continue
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if f.endswith(".py") and "test" not in d)
        elif name.endswith(".py"):
            files = [path]
        else:
            continue
        parts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts.append(f"# file: {os.path.relpath(f, root)}\n{fh.read()}")
        text = "\n\n".join(parts)
        if not text.strip():
            continue
        repos.append((name, text))
        total += len(text)
        if total >= max_bytes:
            break
    return repos


def docstrings(repos: list[tuple[str, str]]) -> list[str]:
    """The documentation strings of the sources, whitespace collapsed: short prose documents."""
    return [" ".join(m.split()) for _, text in repos for m in _DOCSTRING.findall(text)]


def recall_document(rng: np.random.Generator, num_pairs: int) -> str:
    """Key/value list then queries of the same keys (shuffled) with their answers."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
    chars = alphabet[rng.integers(0, len(alphabet), (2, num_pairs, 8))]
    keys, vals = ([row.tobytes().decode() for row in chars[i]] for i in (0, 1))
    lines = ["Remember these pairs."] + [f"{k}: {v}" for k, v in zip(keys, vals)]
    lines.append("Now recall them.")
    lines += [f"{keys[i]} -> {vals[i]}" for i in rng.permutation(num_pairs)]
    return "\n".join(lines) + "\n"


def build_demo_corpus(out_dir: str, seed: int = 0, code_bytes: int = 3_000_000,
                      num_recall_docs: int = 200, recall_pairs: int = 200,
                      with_text: bool = True, proportions: Optional[dict[str, float]] = None,
                      progress: Optional[Callable[[str], None]] = None) -> list[DomainConfig]:
    """Write ``out_dir/{code,recall,text}.bin/.idx`` and return the mixture's domains
    (pass them as ``DataConfig(tokenizer_kind='byte', domains=...)``). A few seconds, offline.
    ``progress`` receives a line when the build starts and one per tokenized domain."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    props = proportions or {"code": 0.5, "recall": 0.3, "text": 0.2}
    os.makedirs(out_dir, exist_ok=True)
    eod = np.array([tok.eos_id], dtype=np.int32)
    names = ["code", "recall"] + (["text"] if with_text else [])
    report = progress or (lambda line: None)
    report(f"demo corpus: building {out_dir}: {', '.join(names)} (Python standard library "
           "sources and docstrings, synthetic key/value recall documents), byte tokens")
    repos = stdlib_repos(code_bytes)

    def write(name: str, docs) -> DomainConfig:
        prefix = os.path.join(out_dir, name)
        count = tokens = 0
        with IndexedWriter(prefix, tok.vocab_size) as w:
            for text in docs:
                ids = np.concatenate([[tok.bos_id], tok.encode_np(text), eod])
                w.add(ids)
                count, tokens = count + 1, tokens + len(ids)
        report(f"demo corpus: {name}: {count:,} documents, {tokens:,} tokens "
               f"[{names.index(name) + 1}/{len(names)}]")
        return DomainConfig(name, [prefix], props.get(name, 0.0))

    domains = [write("code", (text for _, text in repos)),
               write("recall", (recall_document(rng, recall_pairs)
                                for _ in range(num_recall_docs)))]
    if with_text:
        domains.append(write("text", docstrings(repos)))
    return domains
