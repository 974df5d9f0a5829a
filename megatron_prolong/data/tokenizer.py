"""Tokenizers behind one small interface.

BOS/EOS policy (explicit, never implicit): ``encode(text)`` returns only the text's tokens.
Pass ``add_bos=True`` / ``add_eos=True`` to prepend ``bos_id`` / append ``eos_id``. Special-token
strings that occur inside raw text (e.g. a literal "<|eot_id|>" in a web page) are encoded as
plain text, so data can never inject control tokens; templates insert specials by id.

Kinds (``build_tokenizer(kind, path)``):
  llama3        tiktoken BPE from Llama-3's ``tokenizer.model``; ids identical to HF tokenizers
  sentencepiece a sentencepiece model (Llama-2)
  hf            any ``tokenizer.json`` through the ``tokenizers`` package
  byte          built in, no files: ids 0-255 are UTF-8 bytes, specials from 256, vocab 512
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

# The Llama-3 pre-tokenizer pattern (from the model's tokenizer.json / reference code).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens in id order (128000 ...)."""
    names = [
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
        "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_4|>", "<|eot_id|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL - 5)]
    return names


class Tokenizer:
    """Common interface. Subclasses set the id attributes and implement ``_encode``/``decode``."""

    name: str = "base"
    vocab_size: int
    bos_id: int
    eos_id: int  # end of document; appended as EOD by preprocessing
    pad_id: int
    eot_id: Optional[int] = None  # end of a chat turn (None: no chat template support)
    start_header_id: Optional[int] = None
    end_header_id: Optional[int] = None

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_np(self, text: str) -> np.ndarray:
        """Like ``encode`` but returns an int32 array (the fast path for preprocessing)."""
        return np.asarray(self._encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "eot_id": self.eot_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then specials; vectorised with numpy, needs no files."""

    name = "byte"
    SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 256 + len(self.SPECIALS):
            raise ValueError(f"byte tokenizer needs vocab_size >= {256 + len(self.SPECIALS)}, "
                             f"got {vocab_size}")
        self.vocab_size = vocab_size
        (self.bos_id, self.eos_id, self.pad_id, self.start_header_id, self.end_header_id,
         self.eot_id) = range(256, 256 + len(self.SPECIALS))

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            k = i - 256
            out.append(self.SPECIALS[k] if k < len(self.SPECIALS) else f"<|unused_{i}|>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class Llama3Tokenizer(Tokenizer):
    """Llama-3 BPE on tiktoken, read from the model's ``tokenizer.model`` (base64 ranks)."""

    name = "llama3"

    def __init__(self, path: str) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if not os.path.isfile(path):
            raise FileNotFoundError(f"llama3 tokenizer: no tokenizer.model at {path!r}; pass the "
                                    "path of the model's original/tokenizer.model file")
        ranks = load_tiktoken_bpe(path)
        n = len(ranks)
        specials = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = n + LLAMA3_NUM_SPECIAL
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.pad_id = self.eos_id  # Llama-3 has no pad token; padding is always loss-masked
        self.eot_id = specials["<|eot_id|>"]
        self.start_header_id = specials["<|start_header_id|>"]
        self.end_header_id = specials["<|end_header_id|>"]

    def _encode(self, text: str) -> list[int]:
        # disallowed_special=() encodes special-token strings in text as plain text.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes (a token may hold part of a UTF-8 character; decode() replaces it)."""
        return self._enc.decode_bytes([int(i) for i in ids])

    @property
    def special_base(self) -> int:
        """Ids from here on are the 256 special tokens (llama3_special_tokens() order)."""
        return self.vocab_size - LLAMA3_NUM_SPECIAL


class SentencePieceTokenizer(Tokenizer):
    """Llama-2 style sentencepiece model."""

    name = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece tokenizer: no model file at {path!r}")
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """Any ``tokenizer.json``; special ids looked up by their usual names."""

    name = "hf"
    _BOS = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
    _EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]")
    _PAD = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _T

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hf tokenizer: no tokenizer.json at {path!r}")
        self._tok = _T.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(names: tuple) -> Optional[int]:
            return next((vocab[n] for n in names if n in vocab), None)

        bos, eos = find(self._BOS), find(self._EOS)
        if bos is None or eos is None:
            raise ValueError(f"hf tokenizer {path}: cannot find BOS/EOS tokens among "
                             f"{self._BOS} / {self._EOS}")
        self.bos_id, self.eos_id = bos, eos
        pad = find(self._PAD)
        self.pad_id = pad if pad is not None else eos
        self.eot_id = vocab.get("<|eot_id|>")
        self.start_header_id = vocab.get("<|start_header_id|>")
        self.end_header_id = vocab.get("<|end_header_id|>")

    def _encode(self, text: str) -> list[int]:
        # split_special_tokens: special strings inside raw text stay plain text (see module doc).
        self._tok.encode_special_tokens = True
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(kind: str, path: Optional[str] = None, vocab_size: Optional[int] = None
                    ) -> Tokenizer:
    """Factory: kind in {'llama3', 'sentencepiece', 'hf', 'byte'}; ``path`` names the model file
    (not needed for 'byte'; ``vocab_size`` only applies to 'byte')."""
    kind = kind.lower()
    if kind == "byte":
        return ByteTokenizer(vocab_size or 512)
    if path is None:
        raise ValueError(f"tokenizer kind {kind!r} needs a path to its model file")
    if kind in ("llama3", "tiktoken"):
        return Llama3Tokenizer(path)
    if kind in ("sentencepiece", "llama2"):
        return SentencePieceTokenizer(path)
    if kind in ("hf", "huggingface"):
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use llama3, sentencepiece, hf or byte")


class TokenizerMismatchError(ValueError):
    pass


def check_tokenizer_matches_model(tokenizer: Tokenizer, model_vocab_size: int,
                                  padded_vocab_size: Optional[int] = None) -> None:
    """Raise if the tokenizer cannot be used with a model whose embedding has
    ``model_vocab_size`` rows. A model may pad its vocabulary (for TP divisibility): pass the
    unpadded size as ``model_vocab_size`` when known; ``padded_vocab_size`` is then also checked.
    """
    if tokenizer.vocab_size > (padded_vocab_size or model_vocab_size):
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's embedding "
            f"has only {padded_vocab_size or model_vocab_size} rows: ids would index past the "
            "embedding. Use the model's own tokenizer or set the model's vocab_size.")
    if tokenizer.vocab_size != model_vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model expects "
            f"{model_vocab_size}: this is almost certainly the wrong tokenizer for this model "
            "(e.g. a Llama-2 tokenizer with a Llama-3 checkpoint).")
