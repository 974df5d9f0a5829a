"""The ProLong release importer on fixtures in the release's real layout, written with the
project's MDSWriter and merge_index (the bytes mosaicml-streaming's own write: see
test_mds_writer.py): per domain directory a merged index.json over procNN-64/ parts that keep
their own index.json (prolong-data-64K/-512K), a root index.json over 0-0/
(prolong-ultrachat-64K), a `domain` column that is not the directory name."""
import json
import os

import numpy as np
import pytest
import yaml

from megatron_prolong.data.config import DataConfig, load_mixture
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.mds import MDSFormatError
from megatron_prolong.data.mds_import import import_mds
from megatron_prolong.data.mds_writer import MDSWriter, merge_index
from megatron_prolong.data.mixture import build_pretraining_dataset
from tool_modules import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Column types of the release's index files (length: uint64 in the 64K set, int in the 512K one).
COLUMNS_64K = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str",
               "length": "uint64"}
COLUMNS_512K = {**COLUMNS_64K, "length": "int"}
COLUMNS_SFT = {**COLUMNS_64K, "mask": "ndarray:uint8"}


def make_samples(rng, n, L, domain, sft=False, vocab=128256):
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, L).astype(np.uint32)
        cuts = np.sort(rng.choice(np.arange(1, L), 2, replace=False))
        spans = np.array([[0, cuts[0]], [cuts[0], cuts[1]], [cuts[1], L]], dtype=np.uint32)
        s = {"input_ids": ids, "indices": spans, "domain": domain, "length": L}
        if sft:
            s["mask"] = (rng.random(L) < 0.5).astype(np.uint8)
        out.append(s)
    return out


def write_stream(directory, parts, columns, compression=None, size_limit=1 << 12):
    """One stream in the release layout: each list of samples in `parts` is written by MDSWriter
    into its own part directory (keeping its index.json), then merge_index writes the merged
    index.json of `directory` over them. `parts` maps part names (proc00-64, ..., or 0-0) to
    samples."""
    for part, samples in parts.items():
        with MDSWriter(out=os.path.join(directory, part), columns=columns,
                       compression=compression, size_limit=size_limit) as w:
            for s in samples:
                w.write({k: s[k] for k in columns})
    merge_index([os.path.join(directory, part) for part in parts], str(directory))
    merged = json.load(open(os.path.join(directory, "index.json")))
    first = next(iter(parts))
    assert merged["shards"][0]["raw_data"]["basename"].startswith(f"{first}/")  # the real layout
    return directory


def expected_docs(samples):
    return [s["input_ids"][a:b].tolist() for s in samples for a, b in s["indices"]]


def stored_docs(prefix):
    store = DocumentStore(str(prefix))
    return [store.tokens(i).tolist() for i in range(len(store))]


@pytest.fixture(scope="module")
def release_64k(tmp_path_factory):
    """Three domain directories, two procNN-64 parts each; the `domain` column says what the
    release says (textbooks and fineweb-edu both "." here: they must not merge)."""
    root = tmp_path_factory.mktemp("prolong-data-64K")
    rng = np.random.default_rng(0)
    domains = {}
    for name, column, n, length in [("thestackv1_concat_by_repo-65536", "thestackv1_concat_by_repo-65536", 5, 300),
                                    ("textbooks", ".", 4, 200), ("fineweb-edu", ".", 3, 120)]:
        parts = {f"proc{p:02d}-64": make_samples(rng, n, length, column) for p in range(2)}
        write_stream(root / name, parts, COLUMNS_64K)
        domains[name] = [s for samples in parts.values() for s in samples]
    return root, domains


def test_release_layout_imports_each_sample_once_named_by_directory(release_64k, tmp_path):
    root, domains = release_64k
    stats = import_mds(str(root), str(tmp_path / "out"))
    assert sorted(stats) == sorted(domains)
    for name, samples in domains.items():
        # every sample once (not once per index.json), exact ids and document boundaries
        assert stored_docs(tmp_path / "out" / name) == expected_docs(samples)
        assert stats[name]["samples"] == len(samples) and stats[name]["shards"] >= 2
    assert stats["textbooks"]["domain_column"] == ["."]
    assert not any(f.startswith(".") for f in os.listdir(tmp_path / "out"))
    # the stage-1 mixture finds the domains where it looks for them
    mixture = {d.name: d for d in load_mixture(os.path.join(ROOT, "examples", "mixtures",
                                                            "prolong_stage1_64k.yaml"))}
    cfg = DataConfig(variables={"PROLONG_DATA": str(tmp_path / "out")})
    for name in ("code_repos", "textbooks", "fineweb_edu"):
        assert DocumentStore(cfg.expand(mixture[name].paths[0])).lengths.sum() > 0
    written = yaml.safe_load(open(tmp_path / "out" / "mixture.yaml"))
    tokens = {n: sum(len(d) for d in expected_docs(s)) for n, s in domains.items()}
    shares = {d["name"]: d["proportion"] for d in written["domains"]}
    assert shares == pytest.approx({n: t / sum(tokens.values()) for n, t in tokens.items()}, abs=1e-5)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_512k_columns_and_compressed_shards(tmp_path, compression):
    rng = np.random.default_rng(3)
    parts = {"proc00-64": make_samples(rng, 3, 500, "."), "proc01-64": make_samples(rng, 2, 500, ".")}
    write_stream(tmp_path / "in" / "book-524288", parts, COLUMNS_512K, compression=compression)
    import_mds(str(tmp_path / "in"), str(tmp_path / "out"))
    assert stored_docs(tmp_path / "out" / "book-524288") == expected_docs(
        parts["proc00-64"] + parts["proc01-64"])


def test_ultrachat_layout_root_index_over_0_0_with_mask(tmp_path):
    rng = np.random.default_rng(1)
    samples = make_samples(rng, 6, 64, "prolong-ultrachat-64K", sft=True, vocab=500)
    write_stream(tmp_path / "prolong-ultrachat-64K", {"0-0": samples}, COLUMNS_SFT)
    stats = import_mds(str(tmp_path / "prolong-ultrachat-64K"), str(tmp_path / "sft"),
                       name="ultrachat")
    assert list(stats) == ["ultrachat"] and stats["ultrachat"]["samples"] == 6
    store = DocumentStore(str(tmp_path / "sft" / "ultrachat"))
    assert store.has_mask
    masks = [store.mask(i).tolist() for i in range(len(store))]
    assert masks == [s["mask"][a:b].tolist() for s in samples for a, b in s["indices"]]
    # the SFT mixture reads it where it looks
    cfg = DataConfig(tokenizer_kind="byte", check_token_ids=False,
                     mixture=os.path.join(ROOT, "examples", "mixtures", "prolong_sft.yaml"),
                     variables={"SFT_DATA": str(tmp_path / "sft")})
    ds = build_pretraining_dataset(cfg, 128, mode="sft")
    assert ds[0].seq_length == 128 and ds[0].domain == "ultrachat"


# --------------------------------------------------------------------------------------------- errors
def load_import_tool():
    return load_tool("import_prolong_mds")


def _shard(domain_dir, k=1):
    """A shard of the merged index (path under the domain directory) and its entry."""
    index = json.load(open(os.path.join(domain_dir, "index.json")))
    entry = index["shards"][k]
    return os.path.join(domain_dir, entry["raw_data"]["basename"]), entry["raw_data"]["basename"]


def _break(case, domain_dir):
    """Damage the release copy as `case` says; returns what the error must name."""
    path, name = _shard(domain_dir)
    data = bytearray(open(path, "rb").read())
    if case == "truncated":
        open(path, "wb").write(data[:-100])
        return [name, "truncated"]
    if case == "garbled_header":
        data[0:4] = np.uint32(999).tobytes()
        open(path, "wb").write(data)
        return [name, "999 samples"]
    if case == "garbled_sample":
        first = int(np.frombuffer(bytes(data[4:8]), np.uint32)[0])  # offset of sample 0
        data[first:first + 4] = np.uint32(7).tobytes()  # input_ids claims 7 bytes
        open(path, "wb").write(data)
        return [f"{name} sample 0", "garbled"]
    if case == "lfs_pointer":
        open(path, "w").write("version https://git-lfs.github.com/spec/v1\noid sha256:"
                              + "ab" * 32 + f"\nsize {len(data)}\n")
        return [name, "Git-LFS pointer", "git lfs pull"]
    if case == "missing":
        os.remove(path)
        return [name, "missing"]
    if case == "unknown_column":
        index_path = os.path.join(domain_dir, "index.json")
        index = json.load(open(index_path))
        index["shards"][1]["column_encodings"][0] = "ndarray:bfloat16"
        json.dump(index, open(index_path, "w"))
        return [name, "'ndarray:bfloat16'"]
    if case == "length_mismatch":
        index_path = os.path.join(domain_dir, "index.json")
        index = json.load(open(index_path))
        col = index["shards"][1]["column_names"].index("length")
        start = int(np.frombuffer(bytes(data[4:8]), np.uint32)[0])
        n_var = sum(1 for s in index["shards"][1]["column_sizes"] if s is None)
        sizes = np.frombuffer(bytes(data[start:start + 4 * n_var]), np.uint32)
        pos = start + 4 * n_var + int(sizes[:col].sum())  # the fixed-size length column comes last
        data[pos:pos + 8] = np.uint64(12345).tobytes()
        open(path, "wb").write(data)
        return [f"{name} sample 0", "12345"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "garbled_header", "garbled_sample", "lfs_pointer",
                                  "missing", "unknown_column", "length_mismatch"])
def test_format_errors_one_line_naming_the_shard_and_no_dataset_left(release_64k, tmp_path,
                                                                      capsys, case):
    import shutil

    root, _ = release_64k
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    needles = _break(case, copy / "textbooks")
    out = tmp_path / "out"
    rc = load_import_tool().main(["--input", str(copy), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    left = sorted(os.listdir(out)) if out.exists() else []
    assert not any(f.startswith("textbooks") for f in left), left  # nothing of the broken stream
    assert "mixture.yaml" not in left


def test_lfs_pointer_index_and_out_of_vocab(release_64k, tmp_path):
    import shutil

    root, _ = release_64k
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with pytest.raises(MDSFormatError, match="outside the vocabulary of 1000"):
        import_mds(str(copy), str(tmp_path / "bad"), vocab_size=1000)
    open(copy / "fineweb-edu" / "index.json", "w").write(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10\n")
    with pytest.raises(MDSFormatError, match="fineweb-edu/index.json: it is a Git-LFS pointer"):
        import_mds(str(copy), str(tmp_path / "bad2"))
    assert not (tmp_path / "bad2").exists() or not os.listdir(tmp_path / "bad2")
