"""Synthetic recall tasks, generated offline and deterministically at an exact length in tokens.

- `json_kv` (HELMET's JSON key-value retrieval): a JSON object of random UUID keys and values,
  one pair per line, fills the context; the question names one key; the answer is its value.
- `niah_mk` (RULER's multi-key needle in a haystack): natural text (evaluation/text.py) with
  needles "One of the special magic numbers for {word} is: {number}." inserted at sentence
  boundaries: the gold one at the requested depth, distractors with other words elsewhere; the
  question names the gold word; the answer is its 7-digit number.

Length: prompt + gold answer is exactly `length` tokens of the given tokenizer (that is what one
forward pass of the scorer sees). The context is whole units (pairs, sentences) plus a partial
tail (a shortened padding pair of UUID characters / the start of the next sentence) whose size is
searched until the full encoding of the prompt has the right count; the ids are always the
tokenizer's own encoding of the prompt text, never a concatenation of separately encoded pieces.

Depth: the gold pair / needle goes to the unit boundary nearest to `depth` of the context's
tokens (0: first, 1: last). The tail goes to the end of the context for depths below 0.5 and to
its start otherwise, so depth 0 and 1 are exact. `Example.placed_depth` measures it as RULER
defines it: context tokens before the gold item over all context tokens but the gold item's.

Templates: `plain` (base models): BOS, the text, then the answer prefix; `chat` (Llama-3
instruct): the instructions, context and question as the user turn, the answer prefix opening
the assistant turn (data/chat.py's format, as RULER and HELMET prompt chat models).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_prolong.config import RECALL_TASKS
from megatron_prolong.data.chat import turn_header
from megatron_prolong.data.tokenizer import Tokenizer
from megatron_prolong.evaluation.text import key_words, sentence_stream

TEMPLATES = ("plain", "chat")


@dataclass
class Example:
    task: str
    length: int  # len(prompt_ids) + len(answer_ids)
    depth: float  # requested
    index: int
    template: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str  # the answer's text (decoded answer_ids)
    key: str  # what the question asks for
    needle_start: int  # the gold pair / needle spans prompt_ids[needle_start:needle_end]
    needle_end: int
    context_start: int  # the context (JSON object / haystack) spans these prompt_ids
    context_end: int

    @property
    def placed_depth(self) -> float:
        """Context tokens before the gold item / all context tokens but the gold item's."""
        before = self.needle_start - self.context_start
        return before / max(1, before + self.context_end - self.needle_end)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "Example":
        return cls(**record)


class _Task:
    """A context of whole units plus a tail of `c` characters; subclasses say what the units,
    the tail, the gold item and the wording are."""

    intro: str
    label = ""  # a line naming the context, after the instructions
    tail_limit: int
    joiner = ""  # what separates units in the context (for the token estimates)

    def __init__(self, tokenizer: Tokenizer, rng: np.random.Generator, depth: float) -> None:
        self.tok, self.rng, self.depth = tokenizer, rng, depth
        self._units: list[str] = []
        self._unit_tokens: list[int] = []
        self._source: Optional[Iterator[str]] = None  # started at the first unit

    # -- units -------------------------------------------------------------------------------
    def _new_units(self) -> Iterator[str]:
        raise NotImplementedError

    def unit(self, i: int) -> str:
        if self._source is None:
            self._source = self._new_units()
        while len(self._units) <= i:
            text = next(self._source)
            self._units.append(text)
            self._unit_tokens.append(len(self.tok.encode(self.joiner + text)))
        return self._units[i]

    def cumulative_tokens(self, m: int) -> np.ndarray:
        """[0, t0, t0+t1, ...] up to unit m, from units encoded alone (positions, estimates)."""
        if m:
            self.unit(m - 1)
        return np.concatenate([[0], np.cumsum(self._unit_tokens[:m])])

    def boundary_at(self, fraction: float, m: int, last: int) -> int:
        """The unit boundary (0..last) nearest to `fraction` of the first m units' tokens."""
        cum = self.cumulative_tokens(m)
        return int(np.argmin(np.abs(cum[: last + 1] - fraction * cum[-1])))

    # -- what a task fills in ----------------------------------------------------------------
    def context(self, m: int, c: int) -> tuple[str, int, int]:
        """(context text of m units and a c-character tail, the gold item's character span)."""
        raise NotImplementedError

    def question(self) -> tuple[str, str, str]:
        """(question after the context, answer prefix, answer text)."""
        raise NotImplementedError

    def tail_chars(self, m: int) -> int:
        return self.tail_limit

    @property
    def min_units(self) -> int:
        return 0


class JsonKV(_Task):
    intro = ("Below is a JSON object whose keys and values are random strings. Find the value "
             "that belongs to the key given after it.")
    label = "JSON data:\n"
    tail_limit = 36 + 72  # the padding pair: up to a whole key, then up to two UUIDs of value

    def __init__(self, tokenizer, rng, depth):
        super().__init__(tokenizer, rng, depth)
        self._pairs: list[tuple[str, str]] = []
        pad = [self._uuid() for _ in range(3)]
        self._pad_key, self._pad_value = pad[0], pad[1] + pad[2]

    def _uuid(self) -> str:
        return str(uuid.UUID(bytes=self.rng.bytes(16), version=4))

    def _new_units(self):
        while True:
            key, value = self._uuid(), self._uuid()
            self._pairs.append((key, value))
            yield f'"{key}": "{value}",\n'

    @property
    def min_units(self) -> int:
        return 1  # the gold pair is a whole pair

    def gold(self, m: int) -> int:
        return self.boundary_at(self.depth, m, m - 1)

    def context(self, m, c):
        self._gold = self.gold(m)
        entries = [f'"{k}": "{v}"' for k, v in self._pairs[:m]]
        # The padding pair (never asked for) keeps the object valid JSON at any length.
        pad = f'"{self._pad_key[: 1 + min(c, 35)]}": "{self._pad_value[: max(0, c - 35)]}"'
        gold = self._gold
        if self.depth < 0.5:
            entries.append(pad)
        else:
            entries.insert(0, pad)
            gold += 1
        start = len("{\n") + sum(len(e) + 2 for e in entries[:gold])
        return "{\n" + ",\n".join(entries) + "\n}", start, start + len(entries[gold])

    def question(self):
        key, value = self._pairs[self._gold]
        self.key = key
        return f'Key: "{key}"', "The value of this key is:", f' "{value}"'


class NeedleMultiKey(_Task):
    intro = ("A text follows. Hidden in it are a few special magic numbers, each for a "
             "different word. Read it carefully: you will be asked for one of them afterwards.")
    needle = "One of the special magic numbers for {word} is: {number}."
    joiner = " "

    def __init__(self, tokenizer, rng, depth, num_needles: int = 4):
        super().__init__(tokenizer, rng, depth)
        words = rng.choice(len(key_words()), num_needles, replace=False)
        numbers = rng.integers(1_000_000, 10_000_000, num_needles)
        self.needles = [(key_words()[w], int(n)) for w, n in zip(words, numbers)]
        # gold first, then distractors at random fractions of the context
        self.fractions = [depth] + rng.random(num_needles - 1).tolist()
        self._stream = sentence_stream(np.random.default_rng(rng.integers(2**63)))

    def _new_units(self):
        yield from self._stream

    def tail_chars(self, m):
        return len(self.unit(m)) + 1

    def _needle_text(self, k: int) -> str:
        return self.needle.format(word=self.needles[k][0], number=self.needles[k][1])

    def _gold_boundary(self, at: list, m: int, gold_last: bool, tail: str) -> int:
        """The boundary where the gold needle's depth, counted with the distractors' and the
        tail's tokens around it, is nearest to the requested one."""
        if not hasattr(self, "_needle_tokens"):
            self._needle_tokens = [len(self.tok.encode(" " + self._needle_text(k)))
                                   for k in range(len(self.needles))]
        cum = self.cumulative_tokens(m).astype(np.float64)
        j = np.arange(m + 1)
        before, after = cum.copy(), cum[-1] - cum
        (before if gold_last else after)[:] += len(self.tok.encode(tail)) if tail else 0
        for k in range(1, len(at)):
            first = (j > at[k]) | ((j == at[k]) & gold_last)
            before += np.where(first, self._needle_tokens[k], 0)
            after += np.where(first, 0, self._needle_tokens[k])
        return int(np.argmin(np.abs(before / np.maximum(before + after, 1) - self.depth)))

    def context(self, m, c):
        gold_last = self.depth >= 0.5  # among needles at the same boundary
        # The tail: the end of the next sentence before the context, or its start after it,
        # joining space included (so one more character is always one more token or none).
        if gold_last:
            tail = (self.unit(m) + " ")[-c:] if c else ""
        else:
            tail = (" " + self.unit(m))[:c]
        at = [0] + [self.boundary_at(f, m, m) for f in self.fractions[1:]]
        at[0] = self._gold_boundary(at, m, gold_last, tail)
        order = sorted(range(len(at)), key=lambda k: (at[k], -k if gold_last else k))
        parts = []
        for i in range(m + 1):
            parts += [k for k in order if at[k] == i]
            if i < m:
                parts.append(self.unit(i))
        texts = [self._needle_text(p) if isinstance(p, int) else p for p in parts]
        gold = parts.index(0)
        start = sum(len(t) + 1 for t in texts[:gold]) - (1 if gold else 0)
        # the gold span is " One of ... 1234567." (its joining space) or, first, without it
        end = start + len(texts[gold]) + (1 if gold else 0)
        text = " ".join(texts)
        if gold_last:
            return tail + text, start + len(tail), end + len(tail)
        return text + tail, start, end

    def question(self):
        word, number = self.needles[0]
        self.key = word
        return (f"What is the special magic number for {word} mentioned in the text above?",
                f"The special magic number for {word} mentioned in the text above is:",
                f" {number}")


TASK_CLASSES = {"json_kv": JsonKV, "niah_mk": NeedleMultiKey}
assert tuple(TASK_CLASSES) == RECALL_TASKS


def _render(task: _Task, template: str, m: int, c: int, marks: bool = False):
    """(prompt ids, answer ids[, token positions of the gold item's start and end and of the
    context's start and end])."""
    tok = task.tok
    context, gold_start, gold_end = task.context(m, c)
    question, prefix, answer = task.question()
    before = f"{task.intro}\n\n{task.label}"
    user = f"{before}{context}\n\n{question}"
    if template == "plain":
        head = [tok.bos_id]
        prompt = head + tok.encode(f"{user}\n{prefix}")
    else:
        head = [tok.bos_id] + turn_header(tok, "user")
        prompt = (head + tok.encode(user) + [tok.eot_id] + turn_header(tok, "assistant")
                  + tok.encode(prefix))
    answer_ids = tok.encode(answer)
    if not marks:
        return prompt, answer_ids
    start = len(head) + len(tok.encode(before))

    def at(char: int) -> int:  # token position of a character offset into the context
        return start + (len(tok.encode(context[:char])) if char else 0)

    return prompt, answer_ids, (at(gold_start), at(gold_end), start, at(len(context)))


def _total(task, template, m, c) -> int:
    prompt, answer = _render(task, template, m, c)
    return len(prompt) + len(answer)


def _search_tail(task: _Task, template: str, m: int, target: int) -> Optional[int]:
    """A tail size c with exactly `target` tokens for m whole units, or None. The count grows
    with c in steps of about one token (rarely a step back), so: bisect, then look around."""
    lo, hi = 0, task.tail_chars(m)
    if _total(task, template, m, lo) > target or _total(task, template, m, hi) < target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _total(task, template, m, mid) < target:
            lo = mid + 1
        else:
            hi = mid
    for c in sorted(range(max(0, lo - 4), min(task.tail_chars(m), lo + 4) + 1),
                    key=lambda c: abs(c - lo)):
        if _total(task, template, m, c) == target:
            return c
    return None


def _fit(task: _Task, template: str, target: int) -> tuple[int, int]:
    """(m, c) such that the prompt + answer is exactly `target` tokens."""
    overhead = _total(task, template, task.min_units, 0)
    if overhead > target:
        raise ValueError(f"{target} tokens is too short for this task: its fixed text alone "
                         f"takes {overhead}")
    m, budget = task.min_units, target - overhead
    while True:  # the most whole units the estimate lets in
        task.unit(m)
        budget -= task._unit_tokens[m]
        if budget < 0:
            break
        m += 1
    for dm in (0, -1, 1, -2, 2, -3, 3, -4, 4):
        if m + dm >= task.min_units:
            c = _search_tail(task, template, m + dm, target)
            if c is not None:
                return m + dm, c
    raise RuntimeError(f"could not fit the task to exactly {target} tokens")  # not seen yet


def generate_example(task: str, tokenizer: Tokenizer, length: int, depth: float, index: int = 0,
                     seed: int = 0, template: str = "plain") -> Example:
    """One example: a pure function of its arguments (and, for niah_mk, the Python version)."""
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_CLASSES)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose plain or chat")
    if template == "chat" and tokenizer.start_header_id is None:
        raise ValueError(f"tokenizer {tokenizer.name} has no Llama-3 chat tokens; use "
                         "template plain")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    rng = np.random.default_rng(
        [seed, RECALL_TASKS.index(task), length, int(round(depth * 1e6)), index])
    generator = TASK_CLASSES[task](tokenizer, rng, depth)
    m, c = _fit(generator, template, length)
    prompt, answer, (gold, gold_end, start, end) = _render(generator, template, m, c, marks=True)
    return Example(task=task, length=length, depth=depth, index=index, template=template,
                   prompt_ids=[int(i) for i in prompt], answer_ids=[int(i) for i in answer],
                   answer=tokenizer.decode(answer), key=generator.key, needle_start=gold,
                   needle_end=gold_end, context_start=start, context_end=end)


def generate_examples(tasks, tokenizer: Tokenizer, lengths, depths, examples: int = 1,
                      seed: int = 0, template: str = "plain") -> list[Example]:
    """Every task x length x depth x example index, in that order."""
    return [generate_example(t, tokenizer, n, d, i, seed, template)
            for t in tasks for n in lengths for d in depths for i in range(examples)]


def save_examples(examples: list[Example], path: str) -> None:
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json()) + "\n")


def load_examples(path: str) -> list[Example]:
    with open(path) as f:
        return [Example.from_json(json.loads(line)) for line in f if line.strip()]
