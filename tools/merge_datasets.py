#!/usr/bin/env python
"""Join indexed datasets into one: the shards of a sharded preprocessing run, or any datasets
made with the same tokenizer (documents, .lossmask companions and .stats.json are joined).

Examples:
  # the 16 shards written by `preprocess_data.py --shard I/16 --output-prefix data/fineweb`
  python tools/merge_datasets.py --shards-of data/fineweb            # -> data/fineweb.bin/.idx
  # any datasets, in this order
  python tools/merge_datasets.py --input data/part-a data/part-b --output-prefix data/both

The merge of all shards equals, byte for byte, one preprocessing process over the same inputs;
it refuses shards that are not complete (a marker PREFIX.done is written last by each shard)
or that come from different command lines. A rerun after a complete merge is skipped.
Exit 2: inputs that cannot be merged.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.indexed import DataFileError  # noqa: E402
from megatron_prolong.data.merge import MergeError, merge_datasets, merge_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards-of", metavar="PREFIX",
                     help="merge PREFIX.shard-*-of-N (all N must be complete) into PREFIX")
    src.add_argument("--input", nargs="+", metavar="PREFIX", help="dataset prefixes, in order")
    p.add_argument("--num-shards", type=int,
                   help="with --shards-of: N (default: read from the shard names)")
    p.add_argument("--output-prefix", help="output (default with --shards-of: its PREFIX)")
    p.add_argument("--remove-shards", action="store_true",
                   help="with --shards-of: delete the shard files after a successful merge")
    p.add_argument("--force", action="store_true", help="redo a merge that is already complete")
    a = p.parse_args(argv)
    if a.input and not a.output_prefix:
        p.error("--input needs --output-prefix")
    try:
        if a.shards_of:
            stats = merge_shards(a.shards_of, a.num_shards, a.output_prefix, a.force)
        else:
            stats = merge_datasets(a.input, a.output_prefix, a.force)
    except (MergeError, DataFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = stats["output_prefix"]
    if stats.get("skipped"):
        print(f"{out}: already merged from the same inputs, skipped (--force redoes it)")
    else:
        print(f"merged {len(stats['inputs'])} datasets: {stats['docs_kept']:,} documents, "
              f"{stats.get('tokens_kept', 0):,} tokens -> {out}.bin/.idx")
    if a.shards_of and a.remove_shards:
        from megatron_prolong.data.shards import find_shards, output_files

        for prefix in find_shards(a.shards_of, a.num_shards):
            # and the shard's writer lock (no writer left: every shard is complete)
            for path in output_files(prefix) + [prefix + ".done", prefix + ".lock"]:
                if os.path.exists(path):
                    os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
