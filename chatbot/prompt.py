"""A conversation made ready for the model, before it waits for the model.

`fit` keeps every system message and the newest other turns that fit the
model's context beside the reply, and tokenizes them: on the request's own
thread, before it joins the serving batch, so that tokenizing a long
conversation never holds up the replies being generated. Fewer turns never take more
tokens, so the earliest turn that fits is found in a few encodings however
long the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class PromptError(ValueError):
    """The model's chat template refuses these messages (some insist that
    roles alternate, or that the system prompt comes first)."""


@dataclass
class Prompt:
    """The messages sent, their token ids, and how many of the conversation's
    messages were left out to fit the model's context."""

    messages: list[dict]
    ids: list[int]
    dropped: int = 0


def encode(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of `messages` through the model's chat template, ready
    for the reply. Several threads may encode at once: a fast tokenizer only
    reads its settings here (no truncation or padding is ever switched on)."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise PromptError(f"the model's chat template refuses these messages: {exc}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit(messages: list[dict], budget: int, encode: Callable[[list[dict]], list[int]]) -> Prompt:
    """`messages` cut to at most `budget` tokens: every system message, and of
    the others the newest that fit, starting on a user's (or the first). If
    the last message alone is too long, its beginning is cut."""
    budget = max(budget, 1)
    turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
    starts = sorted({0} | {k for k, i in enumerate(turns) if messages[i]["role"] == "user"})
    encoded: dict[int, tuple[list[dict], list[int]]] = {}

    def from_turn(k: int) -> tuple[list[dict], list[int]]:
        if k not in encoded:
            cut = turns[k] if k < len(turns) else len(messages)
            sent = [m for j, m in enumerate(messages) if j >= cut or m["role"] == "system"]
            encoded[k] = sent, encode(sent)
        return encoded[k]

    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(from_turn(starts[mid])[1]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    sent, ids = from_turn(starts[lo])
    return Prompt(sent, ids[-budget:] if len(ids) > budget else ids, dropped=starts[lo])


def max_context(model, tokenizer) -> int:
    """The most tokens the model takes: its positions, or the tokenizer's limit."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 2048
