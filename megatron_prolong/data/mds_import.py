"""Convert released ProLong MDS shards into per-domain indexed datasets (tools/import_prolong_mds.py).

Each MDS sample (``input_ids``, ``indices`` = [start, end) spans of the original documents,
``domain``, optionally ``mask``) becomes one megatron document whose sequences are its spans, so
every original document stays a separate sequence (the boundaries the packer uses). Tokens are
kept verbatim (ProLong's Llama-3 ids); tokens outside every span are counted and dropped.
A ``mixture.yaml`` with the domains' realised token shares is written next to the datasets.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Optional

import numpy as np
import yaml

from .indexed import IndexedWriter
from .mds import MDSFormatError, find_mds_dirs, iter_mds_samples


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "domain"


def _spans(sample: dict, n: int, where: str, indices_key: str) -> np.ndarray:
    idx = sample.get(indices_key)
    if idx is None:
        return np.array([[0, n]], dtype=np.int64)
    spans = np.asarray(idx, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or (spans[:, 0] < 0).any() or (spans[:, 1] > n).any() or \
            (spans[:, 1] <= spans[:, 0]).any() or (spans[1:, 0] < spans[:-1, 1]).any():
        raise MDSFormatError(f"{where}: invalid '{indices_key}' spans {spans.tolist()[:4]}... "
                             f"for {n} tokens (need sorted, non-empty, inside the sample)")
    return spans


def import_mds(input_dir: str, output_dir: str, vocab_size: int = 128256,
               ids_key: str = "input_ids", indices_key: str = "indices",
               domain_key: str = "domain", mask_key: str = "mask",
               default_domain: Optional[str] = None, append_eod: Optional[int] = None,
               allow_pickle: bool = False) -> dict:
    """Returns stats per domain; writes ``output_dir/<domain>.bin/.idx`` (+ ``.lossmask``)."""
    writers: dict[str, IndexedWriter] = {}
    stats: dict = defaultdict(lambda: {"samples": 0, "documents": 0, "tokens": 0,
                                       "dropped_gap_tokens": 0})
    os.makedirs(output_dir, exist_ok=True)
    try:
        for d in find_mds_dirs(input_dir):
            fallback = default_domain or os.path.relpath(d, input_dir).replace(os.sep, "_")
            for shard, k, s in iter_mds_samples(d, allow_pickle):
                where = f"{d}/{shard} sample {k}"
                if ids_key not in s:
                    raise MDSFormatError(f"{where}: no column {ids_key!r} (has {sorted(s)})")
                ids = np.asarray(s[ids_key]).reshape(-1).astype(np.int64)
                if len(ids) and (ids.max() >= vocab_size or ids.min() < 0):
                    raise MDSFormatError(f"{where}: token id {int(ids.max())} outside the "
                                         f"vocabulary of {vocab_size}; wrong --vocab-size?")
                dom = _safe(str(s.get(domain_key) or fallback))
                spans = _spans(s, len(ids), where, indices_key)
                mask = s.get(mask_key)
                if dom not in writers:
                    writers[dom] = IndexedWriter(os.path.join(output_dir, dom), vocab_size,
                                                 with_mask=mask is not None)
                w = writers[dom]
                pieces, mpieces, lengths = [], [], []
                for a, b in spans.tolist():
                    pieces.append(ids[a:b])
                    if mask is not None:
                        mpieces.append(np.asarray(mask).reshape(-1)[a:b])
                    if append_eod is not None:
                        pieces.append(np.array([append_eod]))
                        if mask is not None:
                            mpieces.append(np.zeros(1, np.uint8))
                    lengths.append(b - a + (append_eod is not None))
                toks = np.concatenate(pieces)
                w.add(toks, np.concatenate(mpieces) if mask is not None else None, lengths)
                st = stats[dom]
                st["samples"] += 1
                st["documents"] += len(lengths)
                st["tokens"] += len(toks)
                st["dropped_gap_tokens"] += len(ids) - int((spans[:, 1] - spans[:, 0]).sum())
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    total = sum(v["tokens"] for v in stats.values()) or 1
    mixture = {"domains": [{"name": dom, "paths": [os.path.join(output_dir, dom)],
                            "proportion": round(v["tokens"] / total, 6)}
                           for dom, v in sorted(stats.items())]}
    with open(os.path.join(output_dir, "mixture.yaml"), "w") as f:
        f.write("# Realised token shares of the imported data; edit proportions as needed.\n")
        yaml.safe_dump(mixture, f, sort_keys=False)
    with open(os.path.join(output_dir, "import_stats.json"), "w") as f:
        json.dump(dict(stats), f, indent=2)
    return dict(stats)
