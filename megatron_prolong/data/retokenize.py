"""The released ProLong data (Llama-3 ids) re-tokenized for another model
(tools/import_prolong_mds.py --tokenizer ...).

Each document span of a sample is cut into segments: runs of ordinary tokens with one loss-mask
value, and single special tokens. An ordinary run is decoded to its exact bytes with the Llama-3
tokenizer and re-encoded as text with the target tokenizer, so document boundaries stay where
they were and each masked (or unmasked) run of an SFT conversation is re-encoded as its own span:
its new tokens carry its mask value. A special token maps by role to the target's own
(<|begin_of_text|> -> bos_id, <|end_of_text|> -> eos_id, <|eot_id|> -> eot_id, the header
markers -> start/end_header_id); a target without that role is refused, unless
`specials_as_text`, which encodes the special's name as plain text.

Counted per shard (and reported by the importer): runs whose bytes are not valid UTF-8 (a
document cut inside a character: decoded with U+FFFD replacements), runs the target tokenizer
does not decode back to the same text (normalising tokenizers such as sentencepiece), specials
written as text, and spans that became empty.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from .mds_import import Document, Sample
from .tokenizer import Tokenizer, build_tokenizer, llama3_special_tokens

SPECIAL_ROLES = {"<|begin_of_text|>": "bos_id", "<|end_of_text|>": "eos_id",
                 "<|eot_id|>": "eot_id", "<|start_header_id|>": "start_header_id",
                 "<|end_header_id|>": "end_header_id"}

STAT_KEYS = ("lossy_runs", "changed_text_runs", "specials_as_text", "empty_documents")


class RetokenizeError(ValueError):
    """The data cannot be re-tokenized for this target as asked (one line, what to do)."""


def segments(ids: np.ndarray, mask: Optional[np.ndarray], special_base: int
             ) -> list[tuple[int, int]]:
    """[start, end) runs of one span: a new run at every mask change, and every special token
    (id >= special_base) a run of its own."""
    n = len(ids)
    if n == 0:
        return []
    special = ids >= special_base
    cut = np.zeros(n, dtype=bool)
    cut[0] = True
    cut[1:] |= special[1:] | special[:-1]
    if mask is not None:
        cut[1:] |= mask[1:] != mask[:-1]
    starts = np.flatnonzero(cut)
    return list(zip(starts.tolist(), np.append(starts[1:], n).tolist()))


class Retokenizer:
    """A checked MDS sample -> its documents in the target tokenizer's ids. Holds tokenizer
    specs, not tokenizers, so it pickles to the importer's worker processes; each process builds
    the tokenizers once."""

    def __init__(self, source_path: str, target_kind: str, target_path: Optional[str] = None,
                 target_vocab_size: Optional[int] = None, specials_as_text: bool = False,
                 append_eod: Optional[int] = None):
        self.spec = (source_path, target_kind, target_path, target_vocab_size)
        self.specials_as_text = specials_as_text
        self.append_eod = append_eod
        self._built = None
        self.tokenizers()  # fail now on a bad path or kind, not in a worker

    def __getstate__(self):
        return {**self.__dict__, "_built": None}

    def tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        if self._built is None:
            source_path, kind, path, vocab = self.spec
            source = build_tokenizer("llama3", source_path)
            target = build_tokenizer(kind, path, vocab)
            names = llama3_special_tokens()
            self._special_ids = {}  # source special id -> target ids (or None: refuse)
            for role_name, role in SPECIAL_ROLES.items():
                tid = getattr(target, role, None)
                self._special_ids[source.special_base + names.index(role_name)] = \
                    None if tid is None else [tid]
            self._names = names
            self._built = (source, target)
        return self._built

    def _special(self, sid: int, where: str) -> tuple[list[int], int]:
        """Target ids for a source special token, and 1 if written as text."""
        source, target = self.tokenizers()
        mapped = self._special_ids.get(sid)
        if mapped is not None:
            return mapped, 0
        name = self._names[sid - source.special_base]
        if self.specials_as_text:
            return target.encode(name), 1
        role = SPECIAL_ROLES.get(name)
        why = (f"the target tokenizer has no {role}" if role else
               "it has no counterpart in another tokenizer")
        raise RetokenizeError(f"{where}: special token {name} (id {sid}): {why}; pass "
                              "--specials-as-text to write it as plain text, or use a target "
                              "tokenizer that has it")

    def span(self, ids: np.ndarray, mask: Optional[np.ndarray], where: str,
             stats: Optional[Counter] = None) -> tuple[list[int], list[int]]:
        """One document span -> (target ids, their loss mask); counts into `stats`."""
        source, target = self.tokenizers()
        stats = Counter() if stats is None else stats
        out: list[int] = []
        out_mask: list[int] = []
        for a, b in segments(ids, mask, source.special_base):
            value = 0 if mask is None else int(mask[a])
            if ids[a] >= source.special_base:
                new, as_text = self._special(int(ids[a]), where)
                stats["specials_as_text"] += as_text
            else:
                raw = source.decode_bytes(ids[a:b])
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("utf-8", errors="replace")
                    stats["lossy_runs"] += 1
                new = target.encode(text)
                stats["changed_text_runs"] += target.decode(new) != text
            out.extend(new)
            out_mask.extend([value] * len(new))
        return out, out_mask

    def __call__(self, sample: Sample) -> tuple[Document, dict]:
        stats = Counter(dict.fromkeys(STAT_KEYS, 0))
        tokens: list[int] = []
        masks: list[int] = []
        lengths, source_lengths = [], []
        for a, b in sample.spans.tolist():
            new, new_mask = self.span(sample.ids[a:b], None if sample.mask is None
                                      else sample.mask[a:b], sample.where, stats)
            if self.append_eod is not None:
                new, new_mask = new + [self.append_eod], new_mask + [0]
            if not new:
                stats["empty_documents"] += 1
                continue
            tokens.extend(new)
            masks.extend(new_mask)
            lengths.append(len(new))
            source_lengths.append(b - a)
        doc = Document(np.asarray(tokens, dtype=np.int64),
                       None if sample.mask is None else np.asarray(masks, dtype=np.uint8),
                       lengths, source_lengths)
        return doc, dict(stats)
