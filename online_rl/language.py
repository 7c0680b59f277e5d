"""Is it still language? Two measures of the replies, for any model.

- **Base NLL per token**: the negative log-likelihood the frozen base model
  gives the replies' tokens (temperature 1, its own distribution), averaged
  over each reply's tokens, then over the replies. Babble and made-up words
  are improbable to the base, so it rises; a reply in the base's own
  language keeps it where the base's own samples are. Works for any causal
  LM, the starter or a hub model. Every reply counts once: averaged over all
  tokens instead, the few 96-token replies to prompts the base cannot answer
  (the starter babbles on requests for code) decide the figure, and it
  swings from 0.17 to 0.28 between two samplings of one unchanged model.
  At each position of a reply the figure is the base's NLL *expected* over
  the distribution the token was drawn from (``sum_v q(v) * -log base(v)``,
  `q` the writing version's distribution after temperature and nucleus),
  not only that of the token drawn: the same quantity on average, without
  the luck of the draw at each position (`expected_nll`). The gate bounds it
  to a tenth above the base's own, and with only the drawn tokens two
  samplings of one pair of versions differed by up to 0.085 nats.
- **Excess NLL per token**, what the gate and the tilt bound: the same
  base NLL less, at each position, what the base's own next token would
  cost it there, drawn as the bot samples (``sum_v s(v) * -log base(v)``,
  `s` the base's distribution after the serving temperature and nucleus).
  Expected over the writer's distribution it is 0 for the base's own
  replies at every position, whatever their length. The plain figure
  depends on *where* a reply's tokens are: the first tokens of a reply are
  the uncertain ones (the starter's replies of under 5 tokens cost it 0.79
  nats per token, those of 10 to 20 tokens 0.30), so choosing the shorter
  of the base's own replies (the exact tilt of 16 replies per prompt
  towards the `concise` taste) raised it by 18% (0.424 -> 0.502), past the
  gate's 10%, with no word in them the base would not write. The excess
  rose by 0.028 there: what is left is the cost of the choices themselves
  (stopping earlier than the base expects). Replies sampled at temperature
  1 without the nucleus, which lose words (known words 0.87 against 0.94),
  raised it by 0.30, and at temperature 1.3 by 1.0
  (`benchmarks/bench_headroom.py`).
- **Known-word share**: the share of the replies' words that occur in the
  dialogue corpus (`chatterbot-corpus`, the starter's whole vocabulary of
  real words). Exact for the starter; for a larger model a relative figure
  (compare it with the base's own replies, never with a fixed number).
"""

from __future__ import annotations

import functools
import math
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


def expected_nll(version_logits, base_logits, batch: dict, settings):
    """Per reply: the base's NLL per token, at each position expected over
    the distribution the writing version drew that token from (its logits
    within the base's words, `settings`' temperature and nucleus:
    `GenerationSettings.served_probs`), averaged over the reply's tokens."""
    import torch

    drawn_from = settings.served_probs(version_logits, base_logits)
    base_logp = torch.log_softmax(base_logits, dim=-1).clamp(min=-1e4)  # 0 x -inf: a token never drawn costs 0
    per_token = -(drawn_from * base_logp).sum(-1) * batch["reply_mask"]
    return per_token.sum(-1) / batch["reply_mask"].sum(-1).clamp(min=1)


def position_cost(base_logits, settings):
    """At each position, what the base's own next token costs it on average,
    drawn as the bot samples (`settings`' temperature and nucleus):
    ``sum_v s(v) * -log base(v)``."""
    import torch

    base_logp = torch.log_softmax(base_logits, dim=-1).clamp(min=-1e4)
    return -(settings.next_token_probs(base_logits) * base_logp).sum(-1)


def expected_excess(version_logits, base_logits, batch: dict, settings):
    """Per reply: the excess NLL per token, expected over the distribution
    the writing version drew each token from (`expected_nll` less
    `position_cost`, averaged over the reply's tokens): 0 for the base's own."""
    mask = batch["reply_mask"]
    own = expected_nll(version_logits, base_logits, batch, settings)
    return own - (position_cost(base_logits, settings) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def drawn_excess(base_logits, reply, mask, settings):
    """Per reply: the excess NLL per token of the tokens drawn (the base's
    NLL of each, at temperature 1, less `position_cost`), averaged over the
    reply's tokens: how one reply compares with the base's own at the same
    positions, as the tilt and PPO weigh it."""
    import torch

    base_logp = torch.log_softmax(base_logits, dim=-1).clamp(min=-1e4)
    drawn = -base_logp.gather(-1, reply.unsqueeze(-1)).squeeze(-1)
    return ((drawn - position_cost(base_logits, settings)) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def outside_cost(version_logits, base_logits, mask, settings):
    """What the base's NLL loses to tokens the base would never serve: at
    each position the version's serving distribution (its temperature and
    its own nucleus, `settings`) over the tokens outside the base's serving
    nucleus, each at the base's NLL of it, averaged over the positions in
    `mask`. Differentiable in `version_logits` (the nucleus itself is held
    fixed), for training against it (`online_rl.tilt`).

    The part of the excess NLL that is not a choice among the base's own
    words: it is 0 for the base itself, and for any version whose nucleus
    stays inside the base's, however it re-weights the words within it, so
    it does not pay a version to grow sharper than the base. On the starter
    tilted towards `long` it was three quarters of the excess on held-out
    prompts (docs/learning.md)."""
    import torch

    with torch.no_grad():
        own = settings.next_token_probs(version_logits.detach()) > 0
        # The base's NLL of each token it would never serve, 0 for those it would.
        cost = (-torch.log_softmax(base_logits, -1).clamp(min=-1e4)).masked_fill_(
            settings.next_token_probs(base_logits) > 0, 0.0)
    served = torch.softmax((version_logits / settings.logprob_temperature).masked_fill(~own, -math.inf), -1)
    per_position = (served * cost).sum(-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def reply_excess(model, batches: list[dict], settings):
    """`drawn_excess` of every reply in `online_rl.sampling` batches, in
    order (a `PeftModel`'s adapter disabled: the base judges)."""
    import torch

    return torch.cat([drawn_excess(base, piece["reply"], piece["reply_mask"], settings).cpu()
                      for piece, _, base in version_and_base_logits(model, batches)])


def version_and_base_logits(model, batches: list[dict], version=None):
    """For each piece of whole rows of `online_rl.sampling` batches
    (`row_chunks`): (piece, the writing version's reply logits, the base's).
    `version`: a context in which `model` is the version that wrote the
    replies (a `PeftModel` with its adapter set), or None when the base wrote
    them (a `PeftModel`'s adapter disabled, or a plain model): one forward
    pass then serves as both."""
    import contextlib

    import torch

    from online_rl.sampling import reply_logits, row_chunks

    peft = hasattr(model, "disable_adapter")
    base_context = model.disable_adapter if peft else contextlib.nullcontext
    vocabulary = model.get_output_embeddings().weight.shape[0]
    for piece in (p for b in batches for p in row_chunks(b, vocabulary)):
        # The contexts close before each yield: a generator suspended inside
        # one would leave the caller's grad mode (or adapter) switched.
        with torch.no_grad():
            with base_context():
                base = reply_logits(model, piece)
            own = base
            if version is not None:
                with version():
                    own = reply_logits(model, piece)
        yield piece, own, base


def base_nll_per_token(model, batches: list[dict], settings, *, base_wrote: bool = False) -> float | None:
    """The base's NLL per token (`expected_nll`) of replies in
    `online_rl.sampling` batches written with `settings` by `model`: a
    `PeftModel` with the writing adapter active (the base is it with its
    adapter disabled), or a plain model, the base itself. `base_wrote`: the
    replies are the base's own, a `PeftModel`'s adapter disabled. Averaged
    over the replies."""
    return drift(model, batches, settings, base_wrote=base_wrote)["base_nll"]


def drift(model, batches: list[dict], settings, version=None, *, base_wrote: bool = False) -> dict:
    """How far replies in `online_rl.sampling` batches are from the base:
    ``base_nll``, the base's NLL per token (`expected_nll`, averaged over the
    replies), and the KL of the writing version to the base on its own
    replies, ``sum_t log version(t) - log base(t)`` at `settings`' sampling
    temperature (a Monte-Carlo estimate of KL(version || base)), per reply
    (``kl_to_base``) and per token (``kl_per_token``). The writer:
    `version`, a context in which `model` is it; else, for a `PeftModel`,
    its active adapter, or with `base_wrote` (or for a plain model) the base,
    whose KL is 0. ``excess_nll``: the excess NLL per token
    (`expected_excess`), averaged over the replies."""
    import contextlib

    from online_rl.sampling import token_logprobs

    if version is None and not base_wrote and hasattr(model, "disable_adapter"):
        version = contextlib.nullcontext
    nlls, excess, kls, tokens = [], [], [], 0.0
    temperature = settings.logprob_temperature
    for piece, own, base in version_and_base_logits(model, batches, version):
        nlls += expected_nll(own, base, piece, settings).tolist()
        excess += expected_excess(own, base, piece, settings).tolist()
        if version is not None:
            kls += (token_logprobs(own, piece, temperature) - token_logprobs(base, piece, temperature)).sum(-1).tolist()
        tokens += float(piece["reply_mask"].sum())
    return {"base_nll": mean_of(nlls), "excess_nll": mean_of(excess),
            "kl_to_base": round(sum(kls) / len(kls), 4) if kls else 0.0,
            "kl_per_token": round(sum(kls) / max(tokens, 1.0), 4) if kls else 0.0}


def mean_of(per_reply: list[float]) -> float | None:
    """The mean over the replies, rounded as every language figure is."""
    return round(sum(per_reply) / len(per_reply), 4) if per_reply else None
