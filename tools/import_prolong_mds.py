#!/usr/bin/env python
"""Import the released ProLong data (mosaicml-streaming MDS shards) as indexed datasets.

Every MDS directory (one holding index.json) under --input is read; samples are split by their
'domain' column into OUTPUT/<domain>.bin/.idx, with each original document span ('indices') kept
as its own sequence, so packing keeps ProLong's document boundaries. SFT data with a 'mask'
column also gets OUTPUT/<domain>.lossmask.bin/.idx. A mixture.yaml with the realised token
shares and import_stats.json are written to OUTPUT.

Example (after `huggingface-cli download princeton-nlp/prolong-data-64K --repo-type dataset
--local-dir prolong-64K`):
  python tools/import_prolong_mds.py --input prolong-64K --output-dir data/prolong64k
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.mds import MDSFormatError  # noqa: E402
from megatron_prolong.data.mds_import import import_mds  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="directory holding MDS shards (searched "
                                                  "recursively for index.json)")
    p.add_argument("--output-dir", required=True, help="where the per-domain datasets go")
    p.add_argument("--vocab-size", type=int, default=128256,
                   help="token ids must be below this (Llama-3: 128256)")
    p.add_argument("--ids-key", default="input_ids", help="column with the token ids")
    p.add_argument("--indices-key", default="indices",
                   help="column with the [start, end) document spans (absent: one document)")
    p.add_argument("--domain-key", default="domain", help="column naming the domain")
    p.add_argument("--mask-key", default="mask", help="column with the SFT loss mask, if any")
    p.add_argument("--default-domain", help="domain for samples without a domain column "
                                            "(default: the MDS directory's relative path)")
    p.add_argument("--append-eod", type=int, metavar="ID",
                   help="append this token id after every document span (ProLong's spans "
                        "already hold what the original training saw, so off by default)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow 'pkl' columns (unpickling runs code: trusted data only)")
    a = p.parse_args(argv)
    try:
        stats = import_mds(a.input, a.output_dir, a.vocab_size, a.ids_key, a.indices_key,
                           a.domain_key, a.mask_key, a.default_domain, a.append_eod,
                           a.allow_pickle)
    except (MDSFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for dom, st in sorted(stats.items()):
        print(f"{dom}: {st['samples']:,} samples, {st['documents']:,} documents, "
              f"{st['tokens']:,} tokens")
    print(f"mixture: {os.path.join(a.output_dir, 'mixture.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
