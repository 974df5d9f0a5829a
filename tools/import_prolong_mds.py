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
shard, a shard name that leaves its folder, a zstd shard larger than its index records, unknown
column type, ids outside the vocabulary) stops the import with one `error:` line
naming the shard (and sample) and exit status 2; the stream being written is removed (streams
completed before it are whole and kept).

Re-tokenizing for another model (--tokenizer KIND --tokenizer-path PATH, any kind the project
supports: llama3, sentencepiece, hf, byte): each document span is decoded with the Llama-3
tokenizer (--source-tokenizer-path) and re-encoded with the target, document boundaries kept;
in SFT data each masked or unmasked run is re-encoded as its own span and keeps its mask; special
tokens map by role (BOS, EOS, <|eot_id|>, header markers) to the target's. With --mixture, the
documents of each `long` domain that fall under its minimum length (and would be dropped by the
packer) are counted and reported.

Examples (after `huggingface-cli download princeton-nlp/prolong-data-64K --repo-type dataset
--local-dir prolong-64K`):
  python tools/import_prolong_mds.py --input prolong-64K --output-dir data/prolong64k
  python tools/import_prolong_mds.py --input prolong-ultrachat-64K --output-dir data/sft \\
      --name ultrachat
  python tools/import_prolong_mds.py --input prolong-64K --output-dir data/prolong64k-mistral \\
      --source-tokenizer-path Meta-Llama-3-8B-Instruct/original/tokenizer.model \\
      --tokenizer hf --tokenizer-path Mistral-7B-v0.3/tokenizer.json \\
      --mixture examples/mixtures/prolong_stage1_64k.yaml --workers 8
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.data.mds_import import Columns, import_mds, mixture_min_lengths  # noqa: E402
from megatron_prolong.data.retokenize import Retokenizer  # noqa: E402


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
    r = p.add_argument_group("re-tokenizing for another model")
    r.add_argument("--tokenizer", metavar="KIND",
                   help="target tokenizer kind (llama3, sentencepiece, hf, byte): re-tokenize "
                        "every document span for it (default: keep ProLong's Llama-3 ids)")
    r.add_argument("--tokenizer-path", help="the target tokenizer's model file (tokenizer.model "
                                            "or tokenizer.json)")
    r.add_argument("--tokenizer-vocab-size", type=int,
                   help="vocabulary size of the byte tokenizer (default 512)")
    r.add_argument("--source-tokenizer-path",
                   help="Llama-3's tokenizer.model (original/tokenizer.model of "
                        "Meta-Llama-3-8B-Instruct): decodes ProLong's ids; required with --tokenizer")
    r.add_argument("--specials-as-text", action="store_true",
                   help="write a special token the target lacks (e.g. <|eot_id|> for a Llama-2 "
                        "tokenizer) as its plain text instead of refusing")
    p.add_argument("--mixture",
                   help="a mixture YAML (e.g. examples/mixtures/prolong_stage1_64k.yaml): count and "
                        "report the documents of its `long` domains under their minimum length")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow 'pkl' columns (unpickling runs code: trusted data only)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.tokenizer and not a.source_tokenizer_path:
        p.error("--tokenizer needs --source-tokenizer-path (Llama-3's tokenizer.model) to decode "
                "ProLong's ids")
    cols = Columns(ids=a.ids_key, indices=a.indices_key, mask=a.mask_key, length=a.length_key)
    try:
        convert, out_vocab = None, None
        if a.tokenizer:
            convert = Retokenizer(a.source_tokenizer_path, a.tokenizer, a.tokenizer_path,
                                  a.tokenizer_vocab_size, a.specials_as_text, a.append_eod)
            out_vocab = convert.tokenizers()[1].vocab_size
        min_lengths = mixture_min_lengths(a.mixture) if a.mixture else None
        import_mds(a.input, a.output_dir, name=a.name, vocab_size=a.vocab_size,
                   out_vocab_size=out_vocab, cols=cols, convert=convert, append_eod=a.append_eod,
                   min_lengths=min_lengths, allow_pickle=a.allow_pickle, workers=a.workers,
                   log=print)
    except (ValueError, OSError) as e:  # MDSFormatError, RetokenizeError, a bad mixture or kind
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mixture: {os.path.join(a.output_dir, 'mixture.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
