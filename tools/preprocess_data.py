#!/usr/bin/env python
"""Tokenize JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or parquet into a megatron indexed dataset.

Examples:
  # FineWeb-Edu text, Llama-3 tokenizer, 8 workers
  python tools/preprocess_data.py --input 'fineweb-edu/*.jsonl.zst' \\
      --output-prefix data/fineweb_edu --tokenizer llama3 \\
      --tokenizer-path Meta-Llama-3-8B-Instruct/original/tokenizer.model --workers 8
  # code files concatenated per repository, keep only repositories >= 64K tokens
  python tools/preprocess_data.py --input stack/*.jsonl.gz --output-prefix data/code_64k \\
      --tokenizer llama3 --tokenizer-path tokenizer.model --text-key content \\
      --group-key repo_name --group-sort-key path --min-doc-length 65536
  # UltraChat SFT conversations with assistant-only loss mask
  python tools/preprocess_data.py --input ultrachat.jsonl --output-prefix data/ultrachat \\
      --tokenizer llama3 --tokenizer-path tokenizer.model --sft --messages-key messages
  # shard 3 of 16 (one Slurm array task; slurm/preprocess.sh runs all and merges them)
  python tools/preprocess_data.py --input-list fineweb-files.txt --output-prefix data/fineweb \\
      --tokenizer llama3 --tokenizer-path tokenizer.model --shard 3/16
  python tools/merge_datasets.py --shards-of data/fineweb     # -> data/fineweb.bin/.idx

A rerun with the same inputs and options skips an output that is already complete; a run that
was killed leaves no output that looks complete and is redone; a rerun that fails keeps the
previous complete output. One run per output prefix at a time (PREFIX.lock). Exit 2: bad input
or options, or the prefix in use.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_prolong.data.readers import BadRecordError  # noqa: E402


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[],
                   help="input files, directories or globs (.jsonl, .json, .gz, .zst, .parquet)")
    p.add_argument("--input-list", help="a text file naming inputs (files, directories or "
                                        "globs), one per line; adds to --input")
    p.add_argument("--shard", metavar="I/N",
                   help="process shard I (0-based) of N and write PREFIX.shard-I-of-N; without "
                        "--group-key a shard owns a contiguous range of input files, with it the "
                        "groups whose key hashes to I (every shard then reads all inputs)")
    p.add_argument("--force", action="store_true",
                   help="redo the output even when a complete one from the same inputs and "
                        "options exists")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin, PREFIX.idx (PREFIX.lossmask.* with --sft) and "
                        "PREFIX.stats.json; temporary names until complete")
    p.add_argument("--tokenizer", default="llama3", choices=["llama3", "sentencepiece", "hf", "byte"],
                   help="tokenizer kind (default llama3)")
    p.add_argument("--tokenizer-path", help="tokenizer.model (llama3, sentencepiece) or "
                                            "tokenizer.json (hf); not needed for byte")
    p.add_argument("--text-key", default="text",
                   help="JSON field holding the document text; dots reach nested fields (default text)")
    p.add_argument("--sft", action="store_true",
                   help="records are chats: render with the Llama-3 chat template and write a "
                        "loss mask that is 1 on assistant tokens only")
    p.add_argument("--messages-key", default="messages",
                   help="with --sft: field holding the list of {role, content} messages")
    p.add_argument("--group-key", help="concatenate all records with the same value of this "
                                       "field into one document (e.g. repo_name, book_id)")
    p.add_argument("--group-sort-key", help="order records inside a group by this field: "
                                            "numbers numerically, strings by code point "
                                            "(default: input order)")
    p.add_argument("--group-separator", default="\n\n",
                   help="text inserted between the records of a group (default two newlines)")
    p.add_argument("--min-doc-length", type=int, default=1,
                   help="drop documents shorter than this many tokens, EOD included "
                        "(65536 / 524288 for ProLong's long domains)")
    p.add_argument("--no-eod", action="store_true",
                   help="do not append the EOD token (eos_id) to each document")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend the BOS token to each document (what HF Llama-3 encoding does)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--batch-size", type=int, default=256, help="records per worker task")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="count and skip malformed records instead of stopping with file:line")
    p.add_argument("--stats", help="stats JSON path (default PREFIX.stats.json)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    if not a.input and not a.input_list:
        p.error("give --input and/or --input-list")
    return PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_kind=a.tokenizer,
        tokenizer_path=a.tokenizer_path, text_key=a.text_key, sft=a.sft,
        messages_key=a.messages_key, group_key=a.group_key, group_sort_key=a.group_sort_key,
        group_separator=a.group_separator, min_doc_length=a.min_doc_length,
        append_eod=not a.no_eod, prepend_bos=a.add_bos, workers=a.workers, batch_size=a.batch_size,
        skip_bad_lines=a.skip_bad_lines, progress=not a.quiet, stats_path=a.stats,
        shard=a.shard, input_list=a.input_list, force=a.force)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        stats = preprocess(cfg)
    except (BadRecordError, ValueError, OSError) as e:  # OSError: a path that cannot be used
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = stats["output_prefix"]
    if stats.get("skipped"):
        print(f"{out}: already complete from the same inputs and options, skipped "
              "(--force redoes it)")
        return 0
    print(f"kept {stats['docs_kept']:,} documents / {stats['tokens_kept']:,} tokens, dropped "
          f"{stats['dropped']} -> {out}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
