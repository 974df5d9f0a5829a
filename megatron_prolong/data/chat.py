"""Llama-3 chat template for SFT, with the per-token target mask.

Rendering (identical to the Llama-3-Instruct HF chat template, contents stripped):
  <|begin_of_text|> then per message
  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
The target mask is 1 exactly on assistant content tokens and the assistant turn's <|eot_id|>
(so the model learns to stop); everything else (headers, system/user turns, BOS) is 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    pass


def turn_header(tokenizer: Tokenizer, role: str) -> list[int]:
    """<|start_header_id|>{role}<|end_header_id|>\n\n: what precedes every message's content.
    "\n\n" is its own pre-token before stripped content, so encoding it apart is exact."""
    return ([tokenizer.start_header_id] + tokenizer.encode(role) + [tokenizer.end_header_id]
            + tokenizer.encode("\n\n"))


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                role_key: str = "role", content_key: str = "content"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return (token ids int32, target mask uint8) for one conversation."""
    if tokenizer.eot_id is None or tokenizer.start_header_id is None:
        raise ChatFormatError(f"tokenizer {tokenizer.name} has no Llama-3 chat special tokens "
                              "(<|start_header_id|>, <|eot_id|>); use llama3, hf (Llama-3) or byte")
    if not messages:
        raise ChatFormatError("empty conversation")
    ids: list[int] = [tokenizer.bos_id]
    mask: list[int] = [0]
    n_assistant = 0
    for m in messages:
        try:
            role, content = m[role_key], m[content_key]
        except (KeyError, TypeError):
            raise ChatFormatError(f"message {m!r:.80} lacks {role_key!r}/{content_key!r}") from None
        if role not in ROLES:
            raise ChatFormatError(f"unknown role {role!r}; expected one of {ROLES}")
        header = turn_header(tokenizer, role)
        body = tokenizer.encode(str(content).strip()) + [tokenizer.eot_id]
        is_target = 1 if role == "assistant" else 0
        n_assistant += is_target
        ids += header + body
        mask += [0] * len(header) + [is_target] * len(body)
    if n_assistant == 0:
        raise ChatFormatError("conversation has no assistant turn (nothing to learn)")
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
