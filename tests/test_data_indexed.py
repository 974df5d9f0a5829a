"""The numpy-only indexed-dataset writer against megatron-core's own writer and reader."""
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_prolong.data.indexed import MASK_SUFFIX, IndexedWriter, read_index


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("vocab_size", [512, 128256])
def test_writer_bytes_equal_megatron_core_builder(tmp_path, vocab_size):
    rng = np.random.default_rng(vocab_size)
    docs = []
    for _ in range(40):  # some documents hold several sequences (imported ProLong samples)
        lengths = rng.integers(1, 300, int(rng.integers(1, 4))).tolist()
        docs.append((rng.integers(0, vocab_size, sum(lengths)), lengths,
                     rng.integers(0, 2, sum(lengths)).astype(np.uint8)))
    ours = str(tmp_path / "ours")
    with IndexedWriter(ours, vocab_size, with_mask=True) as w:
        for tokens, lengths, mask in docs:
            w.add(tokens, mask, lengths)
    theirs = str(tmp_path / "theirs")
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    for suffix, dt, col in (("", dtype, 0), (MASK_SUFFIX, np.uint8, 2)):
        builder = IndexedDatasetBuilder(theirs + suffix + ".bin", dtype=dt)
        for doc in docs:
            builder.add_document(np.asarray(doc[col]), doc[1])
        builder.finalize(theirs + suffix + ".idx")
        for ext in (".bin", ".idx"):
            assert _read(ours + suffix + ext) == _read(theirs + suffix + ext), suffix + ext
    ds = IndexedDataset(ours)  # megatron-core reads what we wrote
    flat = [seq for tokens, lengths, _ in docs for seq in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert len(ds) == len(flat) and all((ds[i] == s).all() for i, s in enumerate(flat))
    dt, lengths, doc_idx = read_index(ours)
    assert dt == dtype and lengths.tolist() == ds.sequence_lengths.tolist()
    assert doc_idx.tolist() == ds.document_indices.tolist()


def test_empty_dataset_bytes_equal(tmp_path):
    with IndexedWriter(str(tmp_path / "ours"), 512):
        pass
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert _read(str(tmp_path / "ours") + ext) == _read(str(tmp_path / "theirs") + ext)
    dt, lengths, docs = read_index(str(tmp_path / "ours"))
    assert len(lengths) == 0 and docs.tolist() == [0]


def test_preprocessing_does_not_import_torch():
    """The start-up cost of tools/preprocess_data.py was ~6 s of torch + megatron-core imports."""
    code = ("import sys, megatron_prolong.data.preprocess, megatron_prolong.data.merge\n"
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
