"""How a tilt epoch is judged: its figures on the validation prompts against
bounds a little inside the gate's.

After each epoch the tilt (`online_rl.tilt`) has the policy answer its
validation prompts; `judge_epoch` measures the replies as the gate will
(reward-model score, excess and plain NLL per token against the base, KL to
the base, known words, the most common reply, the ten most common
together and the share of distinct ones) and says how far past its bounds
the epoch went; `epoch_rank` orders epochs for the one to keep;
`validation_limits` measures the base there and sets the bounds from it;
`within_gate` sets the bounds from the gate's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from online_rl.evaluate import reply_stats
from online_rl.language import drift, known_word_fraction

if TYPE_CHECKING:
    from online_rl.tilt import TiltConfig


def language_figures(policy, batches, settings, base_wrote: bool = False) -> dict:
    """`language.drift`'s figures of replies (base NLL and excess NLL per
    token, KL to the base per token) and their known-word share."""
    figures = drift(policy, batches, settings, base_wrote=base_wrote)
    return {**figures, "known_words": known_word_fraction([t for b in batches for t in b["texts"]])}


def validation_limits(policy, base_replies, per_prompt: int, settings, config: TiltConfig) -> dict:
    """The base's figures on its own validation replies (batches of
    `per_prompt` consecutive replies to each prompt) and the bounds every
    epoch is judged against (`judge_epoch`): the excess NLL per token at
    most `config.max_nll_increase` of the base's NLL per token above the
    base's own (0 by definition; the allowance), and the floor of the share
    of distinct replies."""
    figures = language_figures(policy, base_replies, settings, base_wrote=True)
    base_nll, base_excess = figures["base_nll"], figures["excess_nll"]
    base_stats = repetition(base_replies, per_prompt)
    base_distinct = base_stats["distinct_fraction"]
    allowance = (config.max_nll_increase * base_nll
                 if None not in (config.max_nll_increase, base_nll, base_excess) else None)
    return {"base_nll": base_nll, "base_excess": base_excess, "base_known": figures["known_words"],
            "base_distinct": base_distinct, "base_top_ten": base_stats["top_ten_share"], "allowance": allowance,
            "bound": base_excess + allowance if allowance is not None else math.inf,
            "floor": config.min_distinct * base_distinct if config.min_distinct else 0.0}


def judge_epoch(policy, replies, per_prompt: int, reward_fn, settings, config: TiltConfig, limits: dict) -> dict:
    """An epoch's figures on its validation `replies` (batches of
    `per_prompt` consecutive replies to each prompt), and how far past its
    bounds it went (`over_bounds`): the largest of the excess NLL's rise and
    the KL as a share of what they are allowed, and the repetition figures
    against their bounds (at most 1: within all). `limits`: the base's
    excess NLL, the allowance above it and the bound, the floor of the
    distinct share, the base's top-ten share."""
    language = language_figures(policy, replies, settings)
    excess, kl = language["excess_nll"], language["kl_per_token"]
    scores = reward_fn([p for b in replies for p in b["prompts"]], [t for b in replies for t in b["texts"]])
    score = round(sum(scores) / len(scores), 4) if scores else None
    stats = repetition(replies, per_prompt)
    top, distinct, top_ten = stats["top_reply_share"], stats["distinct_fraction"], stats["top_ten_share"]
    allowance = limits["allowance"]
    if excess is None or allowance is None:
        language_over = 0.0
    elif allowance > 0:
        language_over = (excess - limits["base_excess"]) / allowance
    else:  # a bound below the base's own: only how far past it counts
        language_over = math.inf if excess > limits["bound"] else 0.0
    over = max(language_over, kl / config.max_kl if config.max_kl else 0.0,
               top / config.max_top_share if config.max_top_share else 0.0, limits["floor"] / max(distinct, 1e-6),
               _share_of(top_ten, limits["base_top_ten"] + config.max_top_ten_increase)
               if config.max_top_ten_increase is not None else 0.0)
    return {"val_score": score, "val_nll": language["base_nll"], "val_excess_nll": excess,
            "val_known_words": language["known_words"], "val_kl": kl, "val_top_reply_share": top,
            "val_top_ten_share": top_ten, "val_distinct": distinct, "over_bounds": round(over, 4),
            "language_over": round(language_over, 4),
            "within_bound": excess is not None and excess <= limits["bound"] and over <= 1.0}


def _share_of(value: float, bound: float) -> float:
    """`value` as a share of what `bound` allows it (above 1: past it)."""
    return value / bound if bound > 0 else math.inf


def epoch_rank(record: dict) -> tuple:
    """How an epoch's validation record ranks (higher is better): any epoch
    within the bounds (language, KL, repetition) above every epoch outside
    them; within them, the higher reward-model score (the score peaks while
    later epochs only fit the training prompts, and drift); outside them,
    the less far past its bounds (`over_bounds`)."""
    if record["within_bound"]:
        score = record["val_score"]
        return (1, -math.inf if score is None else score)
    over = record["over_bounds"]
    return (0, -math.inf if over is None else -over)


def within_gate(config: TiltConfig, gate) -> TiltConfig:
    """`config` with the bounds it leaves unset taken from the gate's
    (`online_rl.gate.GateConfig`), a tenth tighter: the validation replies
    are fewer than the gate's, and what is measured on them varies more."""
    margin = 0.9
    bounds = {"max_nll_increase": margin * gate.max_nll_increase, "max_kl": margin * gate.max_kl,
              "max_top_share": margin * gate.max_top_share, "min_distinct": gate.min_distinct / margin,
              "max_top_ten_increase": margin * gate.max_top_ten_increase,
              # Each reply a tenth of the ten's allowance: ten at most together.
              "max_reply_share": margin * gate.max_top_ten_increase / 10}
    return dataclasses.replace(config, **{k: v for k, v in bounds.items() if getattr(config, k) is None})


def repetition(batches, per_prompt: int) -> dict:
    """The gate's measures of one reply spread over the prompts, on
    validation batches of `per_prompt` consecutive replies to each prompt."""
    texts = [t for b in batches for t in b["texts"]]
    finished = [bool(f) for b in batches for f in b["finished"].tolist()]
    return reply_stats(texts, finished, per_prompt)
