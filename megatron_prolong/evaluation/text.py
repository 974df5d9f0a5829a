"""Natural text available offline, the haystack of the needle-in-a-haystack task (RULER uses
essays): the prose of Python's own documentation that every Python installation carries.

Sources, in stream order: the language and library reference topics (`pydoc_data.topics`, about
290 KB of prose, loaded at once), then the standard library's documentation strings (about
900 KB, read from the sources only when a haystack needs more than the first source holds); the
stream then starts over in a new order (a 512K-token haystack repeats some sentences, as RULER's
does). Sentences are split by a regular expression (end punctuation, whitespace, a capital letter):
no tokenizer model, no download. Only plain-ASCII prose sentences are kept. The text is that of the
running Python, so a haystack is identical for the same Python version and seed.
"""
from __future__ import annotations

import functools
import re

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_PARAGRAPH = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\b[a-z]{5,10}\b")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def _is_prose(sentence: str) -> bool:
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return (20 <= len(sentence) <= 400 and sentence.isascii() and ">>>" not in sentence
            and letters >= 0.8 * len(sentence) and "magic number" not in sentence)


def _paragraphs(texts) -> tuple[tuple[str, ...], ...]:
    out = []
    for text in texts:
        for block in _PARAGRAPH.split(text):
            sentences = tuple(s for s in split_sentences(block) if _is_prose(s))
            if sentences:
                out.append(sentences)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def reference_paragraphs() -> tuple[tuple[str, ...], ...]:
    from pydoc_data.topics import topics

    return _paragraphs(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def docstring_paragraphs() -> tuple[tuple[str, ...], ...]:
    from megatron_prolong.data.demo_corpus import docstrings, stdlib_repos

    return _paragraphs(docstrings(stdlib_repos(max_bytes=1 << 40)))


def sentence_stream(rng: np.random.Generator):
    """Sentences of whole paragraphs: the reference topics in a random order, then the
    docstrings in a random order, then everything again in new orders, without end."""
    sources = (reference_paragraphs, docstring_paragraphs)
    while True:
        for source in sources:
            paragraphs = source()
            for i in rng.permutation(len(paragraphs)):
                yield from paragraphs[i]


@functools.lru_cache(maxsize=1)
def key_words() -> tuple[str, ...]:
    """Lower-case words (5-10 letters) of the reference topics, sorted: needle keys."""
    words = {w for para in reference_paragraphs() for s in para for w in _WORD.findall(s)}
    return tuple(sorted(words))
