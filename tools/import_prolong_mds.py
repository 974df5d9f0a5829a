#!/usr/bin/env python
"""Import the released ProLong data (mosaicml-streaming MDS shards) as indexed datasets.

Every stream under --input is read once: a directory holding an index.json (the release's
per-domain merged index over its procNN-64/ parts, or --input itself for prolong-ultrachat-64K);
nothing below a stream is read separately. Each stream becomes OUTPUT/<its directory under
--input>.bin/.idx (the names examples/mixtures/ use; the samples' `domain` column is only
reported), with every original document span (`indices`) kept as its own sequence, so packing
keeps ProLong's document boundaries. SFT data (a `mask` column) also gets
OUTPUT/<name>.lossmask.bin/.idx. OUTPUT/mixture.yaml (realised token shares) and
OUTPUT/import_stats.json are written when every stream is complete.

Any format error (truncated or garbled shard, Git-LFS pointer file instead of the data, missing
shard, unknown column type, ids outside the vocabulary) stops the import with one `error:` line
naming the shard (and sample) and exit status 2; the stream being written is removed (streams
completed before it are whole and kept).

Examples (after `huggingface-cli download princeton-nlp/prolong-data-64K --repo-type dataset
--local-dir prolong-64K`):
  python tools/import_prolong_mds.py --input prolong-64K --output-dir data/prolong64k
  python tools/import_prolong_mds.py --input prolong-ultrachat-64K --output-dir data/sft \\
      --name ultrachat
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.mds import MDSFormatError  # noqa: E402
from megatron_prolong.data.mds_import import Columns, import_mds  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="the downloaded dataset: a directory of domain directories (each with "
                        "its merged index.json), or one stream directory holding index.json")
    p.add_argument("--output-dir", required=True, help="where the per-domain datasets go")
    p.add_argument("--name", help="output name when --input is itself one stream (default: its "
                                  "directory name), e.g. ultrachat for examples/mixtures/prolong_sft.yaml")
    p.add_argument("--vocab-size", type=int, default=128256,
                   help="token ids must be below this (Llama-3: 128256)")
    p.add_argument("--ids-key", default="input_ids", help="column with the token ids")
    p.add_argument("--indices-key", default="indices",
                   help="column with the [n, 2] document spans (absent: one document)")
    p.add_argument("--mask-key", default="mask", help="column with the SFT loss mask, if any")
    p.add_argument("--length-key", default="length",
                   help="column with the sample's token count, checked when present")
    p.add_argument("--append-eod", type=int, metavar="ID",
                   help="append this token id after every document span (ProLong's spans "
                        "already hold what the original training saw, so off by default)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes reading (and re-tokenizing) shards in parallel")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow 'pkl' columns (unpickling runs code: trusted data only)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cols = Columns(ids=a.ids_key, indices=a.indices_key, mask=a.mask_key, length=a.length_key)
    try:
        import_mds(a.input, a.output_dir, name=a.name, vocab_size=a.vocab_size, cols=cols,
                   append_eod=a.append_eod, allow_pickle=a.allow_pickle, workers=a.workers,
                   log=print)
    except (MDSFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mixture: {os.path.join(a.output_dir, 'mixture.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
