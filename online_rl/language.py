"""Is it still language? Two measures of the replies, for any model.

- **Base NLL per token**: the negative log-likelihood the frozen base model
  gives each reply token (temperature 1, its own distribution), averaged
  over each reply's tokens, then over the replies. Babble and made-up words
  are improbable to the base, so it rises; a reply in the base's own
  language keeps it where the base's own samples are. Works for any causal
  LM, the starter or a hub model. Every reply counts once: averaged over all
  tokens instead, the few 96-token replies to prompts the base cannot answer
  (the starter babbles on requests for code) decide the figure, and it
  swings from 0.17 to 0.28 between two samplings of one unchanged model.
- **Known-word share**: the share of the replies' words that occur in the
  dialogue corpus (`chatterbot-corpus`, the starter's whole vocabulary of
  real words). Exact for the starter; for a larger model a relative figure
  (compare it with the base's own replies, never with a fixed number).
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def corpus_words() -> frozenset[str]:
    """Every word of the corpus replies."""
    from chatbot.starter import corpus_pairs

    return frozenset(w for _, reply in corpus_pairs() for w in words(reply))


def known_word_fraction(replies: list[str], vocabulary=None) -> float | None:
    """Share of the replies' words that are real corpus words; None without words."""
    vocabulary = corpus_words() if vocabulary is None else vocabulary
    found = [w for r in replies for w in words(r)]
    return round(sum(w in vocabulary for w in found) / len(found), 4) if found else None


def base_nll_per_token(model, batches: list[dict]) -> float | None:
    """NLL per token under the base (a `PeftModel`'s adapter disabled, or a
    plain model) of each reply in `online_rl.sampling` batches, averaged
    over the replies."""
    import contextlib

    from online_rl.sampling import reply_logprobs

    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with disabled:
        return mean_nll_per_token([reply_logprobs(model, batch, 1.0) for batch in batches], batches)


def mean_nll_per_token(logprobs: list, batches: list[dict]) -> float | None:
    """From each batch's reply-token log-probabilities (temperature 1): the
    NLL per token of each reply, averaged over the replies."""
    per_reply = [x for logp, batch in zip(logprobs, batches)
                 for x in (-logp.sum(-1) / batch["reply_mask"].sum(-1).clamp(min=1)).tolist()]
    return round(sum(per_reply) / len(per_reply), 4) if per_reply else None
