"""megatron-core indexed datasets (.bin/.idx): an atomic writer and a validated, fast reader.

Layout used by this project: one *sequence* per document (the EOD token appended by
preprocessing). Imported ProLong data may group several sequences (the original documents of one
MDS sample) into one megatron *document*; readers here always work per sequence.
SFT loss masks live in a companion dataset ``<prefix>.lossmask`` (uint8, same lengths).
"""
from __future__ import annotations

import os
import struct
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

# The .idx layout of megatron-core's IndexedDataset (0.16), written here with numpy alone so
# that preprocessing starts without importing torch and megatron-core (~6 s); reading stays
# megatron-core's IndexedDataset. tests/test_data_indexed.py proves the bytes are identical.
#   header "MMIDIDX\0\0", version <Q 1, dtype code <B, #sequences <Q, #documents <Q,
#   sequence lengths int32[#seq], byte pointers int64[#seq], document indices int64[#doc]
INDEX_HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
DTYPE_CODES = {np.dtype(t): code for t, code in (
    (np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4), (np.int64, 5),
    (np.float64, 6), (np.float32, 7), (np.uint16, 8))}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}
MASK_SUFFIX = ".lossmask"


class DataFileError(RuntimeError):
    """A dataset file is missing, truncated or inconsistent."""


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: Optional[int]) -> np.dtype:
    """megatron-core's choice: uint16 for vocabularies below 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


def write_index(idx_path: str, dtype, sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> None:
    """Write a .idx file; ``document_indices`` starts with 0 and ends with #sequences."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<QQ", len(lengths), len(docs)))
        for arr in (lengths, pointers, docs):
            f.write(arr.tobytes(order="C"))


def read_index(prefix: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths int32, document indices int64) of a checked pair, as
    memory maps (no megatron-core import; the merge tool uses this)."""
    dtype, lengths, n_doc = _check_pair(prefix)
    docs = _map(get_idx_path(prefix), np.int64, HEADER_BYTES + 12 * len(lengths), n_doc)
    return dtype, lengths, docs


def _map(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class _Growable:
    """An append-only numpy array (amortised doubling): 4-8 bytes per entry, not a Python list."""

    def __init__(self, dtype) -> None:
        self._a = np.zeros(1024, dtype=dtype)
        self.n = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self._a.dtype).reshape(-1)
        if self.n + len(values) > len(self._a):
            self._a = np.resize(self._a, max(2 * len(self._a), self.n + len(values)))
        self._a[self.n:self.n + len(values)] = values
        self.n += len(values)

    @property
    def array(self) -> np.ndarray:
        return self._a[:self.n]


class _BinWriter:
    """One .bin under construction plus its index arrays."""

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.file = open(bin_path, "wb", buffering=1 << 20)
        self.lengths = _Growable(np.int32)
        self.documents = _Growable(np.int64)
        self.documents.extend([0])

    def add(self, values: np.ndarray, lengths: Sequence[int]) -> None:
        self.file.write(np.asarray(values).astype(self.dtype, copy=False).tobytes(order="C"))
        self.lengths.extend(lengths)
        self.documents.extend([self.lengths.n])

    def finalize(self, idx_path: str) -> None:
        self.file.close()
        write_index(idx_path, self.dtype, self.lengths.array, self.documents.array)


def _tmp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp-{os.getpid()}"


class IndexedWriter:
    """Writes ``prefix.bin/.idx`` (and optionally the loss-mask companion) under temporary names
    and renames them only in ``close()``; on error (or ``abort()``) the temporaries are deleted,
    so a half-written dataset never looks complete. Use as a context manager."""

    def __init__(self, prefix: str, vocab_size: int, with_mask: bool = False) -> None:
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = _tmp_prefix(prefix)
        self._builder = _BinWriter(get_bin_path(self._tmp), self.dtype)
        self._mask_builder = (_BinWriter(get_bin_path(self._tmp + MASK_SUFFIX), np.uint8)
                              if with_mask else None)
        self.num_sequences = 0
        self.num_tokens = 0
        self._closed = False

    def add(self, tokens: np.ndarray, mask: Optional[np.ndarray] = None,
            lengths: Optional[Sequence[int]] = None) -> None:
        """Add one megatron document: by default a single sequence; ``lengths`` splits it into
        several sequences (kept as separate documents by this project's readers)."""
        tokens = np.asarray(tokens)
        lengths = [len(tokens)] if lengths is None else [int(x) for x in lengths]
        if sum(lengths) != len(tokens) or min(lengths) <= 0:
            raise ValueError(f"sequence lengths {lengths[:8]}... do not tile {len(tokens)} tokens")
        self._builder.add(tokens, lengths)
        if self._mask_builder is not None:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("a loss mask of the same length as the tokens is required")
            self._mask_builder.add(np.asarray(mask, dtype=np.uint8), lengths)
        self.num_sequences += len(lengths)
        self.num_tokens += len(tokens)

    def _tmp_files(self) -> list[tuple[str, str]]:
        pairs = [(self._tmp, self.prefix)]
        if self._mask_builder is not None:
            pairs.append((self._tmp + MASK_SUFFIX, self.prefix + MASK_SUFFIX))
        return pairs

    def close(self, before_publish: Optional[Callable[[], None]] = None) -> None:
        """Finish the temporaries, call `before_publish` (e.g. retire the previous output's
        marker), then rename them into place. A second call does nothing."""
        if self._closed:
            return
        self._builder.finalize(get_idx_path(self._tmp))
        if self._mask_builder is not None:
            self._mask_builder.finalize(get_idx_path(self._tmp + MASK_SUFFIX))
        if before_publish is not None:
            before_publish()
        publish(self._tmp_files())
        self._closed = True

    def abort(self) -> None:
        for b in (self._builder, self._mask_builder):
            if b is not None:
                close_discarding(b.file)
        remove_pairs(tmp for tmp, _ in self._tmp_files())

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def close_discarding(f) -> None:
    """Close a file that is being thrown away. Closing flushes its buffer, which fails again on
    the full disk that made us give up (ENOSPC): that must not stop the clean-up. The
    descriptor is closed even when the flush fails (io.BufferedWriter.close)."""
    try:
        f.close()
    except OSError:
        pass


def publish(pairs: Sequence[tuple[str, str]]) -> None:
    """Rename finished (temporary prefix, final prefix) pairs into place: .bin first, .idx last,
    since a reader only trusts a prefix whose .idx exists."""
    for tmp, final in pairs:
        os.replace(get_bin_path(tmp), get_bin_path(final))
        os.replace(get_idx_path(tmp), get_idx_path(final))


def remove_pairs(prefixes: Iterable[str]) -> None:
    """Delete the .bin/.idx of each (temporary) prefix that exist: an unfinished output."""
    for prefix in prefixes:
        for path in (get_bin_path(prefix), get_idx_path(prefix)):
            if os.path.exists(path):
                os.remove(path)


def _check_pair(prefix: str) -> tuple[np.dtype, np.ndarray, int]:
    """Validate that prefix.bin/.idx exist and agree in size, with errors that say what to do;
    returns what the header says: (token dtype, sequence lengths memory map, #documents)."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.exists(p)]
    if missing:
        raise DataFileError(f"indexed dataset {prefix!r}: missing {', '.join(missing)}. Run "
                            "tools/preprocess_data.py to create it, or fix the path in the mixture.")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER or head[17] not in CODE_DTYPES:
        raise DataFileError(f"{idx_path}: not a megatron .idx file (bad or short header)")
    dtype = CODE_DTYPES[head[17]]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expected_idx = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if size < expected_idx:
        raise DataFileError(f"{idx_path}: truncated ({size} bytes, header promises "
                            f"{expected_idx}); re-run preprocessing for this dataset")
    lengths = _map(idx_path, np.int32, HEADER_BYTES, n_seq)
    expected_bin = int(lengths.astype(np.int64).sum()) * dtype.itemsize
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise DataFileError(f"{bin_path}: {actual_bin} bytes but {idx_path} describes "
                            f"{expected_bin}; the pair is truncated or mismatched. Re-run "
                            "preprocessing (outputs are only renamed into place when complete).")
    return dtype, lengths, n_doc


def _megatron_indexed_dataset():
    """megatron-core's reader, imported on first use (it pulls in torch; its TE/apex import
    warnings are filtered by the package, expected_warnings.py)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset


class DocumentStore:
    """Read-only view of one indexed dataset: per-sequence lengths and fast token slices."""

    def __init__(self, prefix: str, vocab_size: Optional[int] = None) -> None:
        _check_pair(prefix)
        self.prefix = prefix
        ds = _megatron_indexed_dataset()(prefix, mmap=True)
        self.lengths = ds.sequence_lengths.astype(np.int64)
        dtype = ds.index.dtype
        self._starts = ds.index.sequence_pointers // np.dtype(dtype).itemsize
        self._tokens = np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")
        self.vocab_size = vocab_size
        self._mask = None
        if os.path.exists(get_idx_path(prefix + MASK_SUFFIX)):
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
