"""megatron-core indexed datasets (.bin/.idx): an atomic writer and a validated, fast reader.

Layout used by this project: one *sequence* per document (the EOD token appended by
preprocessing). Imported ProLong data may group several sequences (the original documents of one
MDS sample) into one megatron *document*; readers here always work per sequence.
SFT loss masks live in a companion dataset ``<prefix>.lossmask`` (uint8, same lengths).
"""
from __future__ import annotations

import os
import struct
import warnings
from typing import Optional, Sequence

import numpy as np

with warnings.catch_warnings():
    # megatron.core's package import warns about absent TE/apex, irrelevant to data files.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

MASK_SUFFIX = ".lossmask"


class DataFileError(RuntimeError):
    """A dataset file is missing, truncated or inconsistent."""


def _tmp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp-{os.getpid()}"


class IndexedWriter:
    """Writes ``prefix.bin/.idx`` (and optionally the loss-mask companion) under temporary names
    and renames them only in ``close()``; on error (or ``abort()``) the temporaries are deleted,
    so a half-written dataset never looks complete. Use as a context manager."""

    def __init__(self, prefix: str, vocab_size: int, with_mask: bool = False) -> None:
        self.prefix = prefix
        self.dtype = DType.optimal_dtype(vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = _tmp_prefix(prefix)
        self._builder = IndexedDatasetBuilder(get_bin_path(self._tmp), dtype=self.dtype)
        self._mask_builder = (IndexedDatasetBuilder(get_bin_path(self._tmp + MASK_SUFFIX),
                                                    dtype=np.uint8) if with_mask else None)
        self.num_sequences = 0
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, mask: Optional[np.ndarray] = None,
            lengths: Optional[Sequence[int]] = None) -> None:
        """Add one megatron document: by default a single sequence; ``lengths`` splits it into
        several sequences (kept as separate documents by this project's readers)."""
        tokens = np.asarray(tokens)
        lengths = [len(tokens)] if lengths is None else [int(x) for x in lengths]
        if sum(lengths) != len(tokens) or min(lengths) <= 0:
            raise ValueError(f"sequence lengths {lengths[:8]}... do not tile {len(tokens)} tokens")
        self._builder.add_document(tokens.astype(self.dtype, copy=False), lengths)
        if self._mask_builder is not None:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("a loss mask of the same length as the tokens is required")
            self._mask_builder.add_document(np.asarray(mask, dtype=np.uint8), lengths)
        self.num_sequences += len(lengths)
        self.num_tokens += len(tokens)

    def _tmp_files(self) -> list[tuple[str, str]]:
        pairs = [(self._tmp, self.prefix)]
        if self._mask_builder is not None:
            pairs.append((self._tmp + MASK_SUFFIX, self.prefix + MASK_SUFFIX))
        return pairs

    def close(self) -> None:
        self._builder.finalize(get_idx_path(self._tmp))
        if self._mask_builder is not None:
            self._mask_builder.finalize(get_idx_path(self._tmp + MASK_SUFFIX))
        for tmp, final in self._tmp_files():
            # .bin first, .idx last: a reader only trusts a prefix whose .idx exists.
            os.replace(get_bin_path(tmp), get_bin_path(final))
            os.replace(get_idx_path(tmp), get_idx_path(final))

    def abort(self) -> None:
        for b in (self._builder, self._mask_builder):
            if b is not None and not b.data_file.closed:
                b.data_file.close()
        for tmp, _ in self._tmp_files():
            for path in (get_bin_path(tmp), get_idx_path(tmp)):
                if os.path.exists(path):
                    os.remove(path)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_pair(prefix: str) -> None:
    """Validate that prefix.bin/.idx exist and agree in size, with errors that say what to do."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.exists(p)]
    if missing:
        raise DataFileError(f"indexed dataset {prefix!r}: missing {', '.join(missing)}. Run "
                            "tools/preprocess_data.py to create it, or fix the path in the mixture.")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise DataFileError(f"{idx_path}: not a megatron .idx file (bad or short header)")
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expected_idx = 34 + n_seq * (4 + 8) + n_doc * 8
    if size < expected_idx:
        raise DataFileError(f"{idx_path}: truncated ({size} bytes, header promises "
                            f"{expected_idx}); re-run preprocessing for this dataset")
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=34, shape=(n_seq,))
    expected_bin = int(lengths.astype(np.int64).sum()) * DType.size(DType.dtype_from_code(code))
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise DataFileError(f"{bin_path}: {actual_bin} bytes but {idx_path} describes "
                            f"{expected_bin}; the pair is truncated or mismatched. Re-run "
                            "preprocessing (outputs are only renamed into place when complete).")


class DocumentStore:
    """Read-only view of one indexed dataset: per-sequence lengths and fast token slices."""

    def __init__(self, prefix: str, vocab_size: Optional[int] = None) -> None:
        _check_pair(prefix)
        self.prefix = prefix
        ds = IndexedDataset(prefix, mmap=True)
        self.lengths = ds.sequence_lengths.astype(np.int64)
        dtype = ds.index.dtype
        self._starts = ds.index.sequence_pointers // np.dtype(dtype).itemsize
        self._tokens = np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")
        self.vocab_size = vocab_size
        self._mask = None
        if IndexedDataset.exists(prefix + MASK_SUFFIX):
            _check_pair(prefix + MASK_SUFFIX)
            self._mask = np.memmap(get_bin_path(prefix + MASK_SUFFIX), dtype=np.uint8, mode="r")
            if len(self._mask) != len(self._tokens):
                raise DataFileError(f"{prefix}{MASK_SUFFIX}: loss mask has {len(self._mask)} "
                                    f"entries but the dataset has {len(self._tokens)} tokens")
        del ds

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def has_mask(self) -> bool:
        return self._mask is not None

    def tokens(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        start = int(self._starts[i]) + offset
        n = int(self.lengths[i]) - offset if length is None else length
        out = self._tokens[start:start + n]
        if self.vocab_size is not None and n and out.max() >= self.vocab_size:
            bad = int(out.max())
            raise DataFileError(f"{self.prefix}: sequence {i} holds token id {bad} >= vocab size "
                                f"{self.vocab_size}; the data was tokenized with a different "
                                "tokenizer than the one configured")
        return out

    def mask(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        if self._mask is None:
            raise DataFileError(f"{self.prefix}: no {MASK_SUFFIX} companion (needed for SFT)")
        start = int(self._starts[i]) + offset
        n = int(self.lengths[i]) - offset if length is None else length
        return self._mask[start:start + n]


class DocumentPool:
    """Several stores seen as one list of documents (one domain may have many paths)."""

    def __init__(self, prefixes: Sequence[str], vocab_size: Optional[int] = None) -> None:
        if not prefixes:
            raise ValueError("a domain needs at least one dataset path")
        self.stores = [DocumentStore(p, vocab_size) for p in prefixes]
        self.lengths = np.concatenate([s.lengths for s in self.stores])
        self._offsets = np.cumsum([0] + [len(s) for s in self.stores])
        self.has_mask = all(s.has_mask for s in self.stores)

    def __len__(self) -> int:
        return len(self.lengths)

    def _locate(self, doc: int) -> tuple[DocumentStore, int]:
        k = int(np.searchsorted(self._offsets, doc, side="right")) - 1
        return self.stores[k], doc - int(self._offsets[k])

    def tokens(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        store, i = self._locate(doc)
        return store.tokens(i, offset, length)

    def mask(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        store, i = self._locate(doc)
        return store.mask(i, offset, length)
