"""Candidate against the active version and the base, on held-out prompts.

The candidate, the active version and the base each reply to the same
held-out prompts, `samples` times, sampled as the bot serves (same seed for
each); while the held-out prompts are few, more times each, up to
`min_replies` replies per version (the language figures vary a lot from
reply to reply, and the gate bounds them to a tenth). Measured:

- **win rates**: the share of replies where the candidate's scores higher
  than the active version's (ties count half), under the reward model PPO
  optimized (``win_rate``) and under the **judge**, a reward model PPO never
  saw, trained on other thumbs (``judge_win_rate``), each with its standard
  error over the prompts (``win_rate_se``, ``judge_win_rate_se``). Scores
  are raw reward-model logits, one scale for both versions: nothing is
  normalized per batch here.
- **held-out thumbs**: on rated replies from held-out conversations, how
  much more likely (per token, against the active version) the candidate
  makes the liked replies than the disliked ones: real users' evidence that
  no reward model stands between.
- **KL to the base**: ``sum_t log pi(t) - log base(t)`` on the version's own
  samples, per token and per reply (a Monte-Carlo estimate of
  KL(version || base) at the serving temperature).
- **language** (`online_rl.language`): the base model's NLL per token and
  the known-word share of each version's replies, the base's own included,
  so that drift is judged against the base, not only the previous round.
- signs of degenerate replies: share of distinct replies, of the most
  common reply and of the ten most common, of empty replies, of replies
  cut off at the reply cap, mean words per reply; and a few replies side
  by side, to be read.

The gate (`online_rl.gate`) decides from these numbers; this module only
measures.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from online_rl.language import drift, known_word_fraction
from online_rl.sampling import encode_replies, reply_logprobs, sample_many

CANDIDATE, ACTIVE = "default", "active"


@dataclass
class EvalConfig:
    # Held-out prompts the versions answer. Prompts differ in how far a
    # candidate's language drifts on them (a standard deviation of about 0.07
    # nats per token between prompts, beside 0.14 between 8 replies to one):
    # the same replies spread over more prompts judge more of them.
    max_prompts: int = 128
    samples: int = 4  # replies per held-out prompt and version ...
    # ... or more, up to `max_samples`, while there are fewer than
    # min_replies / samples prompts. The language figure varies from reply to
    # reply (a standard deviation of about 0.24 nats per token between
    # replies to one prompt, on the starter), and the gate bounds it to a
    # tenth, about 0.045 nats: with 256 replies per version the difference
    # between a candidate and the base moved by 0.02 from one sampling to
    # the next, with 1024 by about 0.012.
    min_replies: int = 1024
    max_samples: int = 16
    max_heldout_thumbs: int = 400  # rated held-out replies scored for the thumbs margin
    seed: int = 1234
    examples: int = 6  # replies shown side by side in the metrics


def most_common(replies: list[str], k: int = 10) -> set[str]:
    """The `k` most common of `replies`: a taste pleased by a few stock
    replies said to every prompt shows as these taking a large share."""
    return {reply for reply, _ in Counter(replies).most_common(k)}


def top_ten_share(replies: list[str]) -> float:
    """The share of `replies` that are one of their ten most common."""
    top = most_common(replies)
    return round(sum(r in top for r in replies) / max(1, len(replies)), 4)


def reply_stats(texts: list[str], finished: list[bool], samples: int = 1) -> dict:
    """Signs of degenerate replies. `texts` holds `samples` consecutive replies
    to each prompt; distinct, top-reply and top-ten shares are taken over one
    reply per prompt (a small model may well write the same reply every time
    it is asked one thing: that is not one reply for every prompt), for each
    of the `samples` draws in turn, and averaged: on a hundred-odd prompts
    one draw's top-ten share moves by several points from one sampling to
    the next, and the gate bounds it against the base's."""
    n = max(1, len(texts))
    draws = [texts[j::samples] for j in range(max(1, samples))] if texts else [[]]

    def mean(figure) -> float:
        return round(sum(figure(d) for d in draws) / len(draws), 4)

    return {
        "distinct_fraction": mean(lambda d: len(set(d)) / max(1, len(d))),
        "top_reply_share": mean(lambda d: Counter(d).most_common(1)[0][1] / len(d) if d else 0.0),
        "top_ten_share": mean(top_ten_share),
        "empty_fraction": round(sum(not t.strip() for t in texts) / n, 4),
        "cut_off_fraction": round(sum(not f for f in finished) / n, 4),
        "mean_words": round(sum(len(t.split()) for t in texts) / n, 2),
    }


def _use(model, adapter: str | None):
    """A context in which `model` is the named adapter, or the base for None."""
    import contextlib

    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def samples_per_prompt(prompts: int, config: EvalConfig) -> int:
    """Replies per held-out prompt and version: `config.samples`, or more
    while the prompts are few (at least `min_replies` in all, at most
    `max_samples` each)."""
    wanted = math.ceil(config.min_replies / max(1, prompts))
    return max(config.samples, min(config.max_samples, wanted))


def _version_replies(model, tokenizer, prompts, settings, config: EvalConfig, adapter: str | None,
                     samples: int) -> dict:
    """One version's samples, KL to the base and language figures."""
    torch.manual_seed(config.seed)
    with _use(model, adapter):
        batches = sample_many(model, tokenizer, prompts, settings)
    figures = drift(model, batches, settings, (lambda: _use(model, adapter)) if adapter else None,
                    base_wrote=adapter is None)
    texts = [t for b in batches for t in b["texts"]]
    finished = [bool(f) for b in batches for f in b["finished"].tolist()]
    return {
        "texts": texts,
        **figures,
        "known_words": known_word_fraction(texts),
        "stats": reply_stats(texts, finished, samples),
    }


def heldout_thumbs_margin(model, tokenizer, examples, active: str | None, max_examples: int) -> dict:
    """Mean per-token log-likelihood gain (candidate over active) of the liked
    held-out replies minus that of the disliked ones, with its standard
    error. Positive: the candidate moved towards what held-out raters liked."""
    examples = examples[:max_examples]
    liked = [e for e in examples if e.label]
    disliked = [e for e in examples if not e.label]
    if not liked or not disliked:
        return {"examples": len(examples), "margin": None, "se": None}
    gains = []
    for i in range(0, len(examples), 64):
        chunk = examples[i:i + 64]
        batch = encode_replies(tokenizer, [e.prompt for e in chunk], [e.reply for e in chunk],
                               device=next(model.parameters()).device)
        mask = batch["reply_mask"].float()
        with _use(model, CANDIDATE):
            cand = reply_logprobs(model, batch)
        with _use(model, active):
            act = reply_logprobs(model, batch)
        gains.extend(((cand - act).sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
    up = [g for g, e in zip(gains, examples) if e.label]
    down = [g for g, e in zip(gains, examples) if not e.label]

    def mean_var(xs):
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)

    (mu, vu), (md, vd) = mean_var(up), mean_var(down)
    return {"examples": len(examples), "margin": round(mu - md, 5),
            "se": round(math.sqrt(vu / len(up) + vd / len(down)), 5)}


def _wins(candidate: list[float], active: list[float]) -> list[float]:
    """Each reply's win: 1 where the candidate's scores higher, a half for a tie."""
    return [1.0 if c > a else 0.5 if c == a else 0.0 for c, a in zip(candidate, active)]


def win_rate(candidate: list[float], active: list[float]) -> float:
    return round(sum(_wins(candidate, active)) / len(candidate), 4)


def win_rate_se(candidate: list[float], active: list[float], samples: int) -> float | None:
    """The standard error of `win_rate` when each run of `samples`
    consecutive replies answers one prompt: replies to one prompt are not
    independent (the same prompt, often the same reply), so the prompts are
    the units, each with its own mean win. None with fewer than two prompts."""
    wins = _wins(candidate, active)
    per_prompt = [sum(wins[i:i + samples]) / len(wins[i:i + samples]) for i in range(0, len(wins), max(1, samples))]
    n = len(per_prompt)
    if n < 2:
        return None
    mean = sum(per_prompt) / n
    return round(math.sqrt(sum((w - mean) ** 2 for w in per_prompt) / (n - 1) / n), 4)


def compare(model, tokenizer, prompts: list[list[dict]], settings, reward_fn, config: EvalConfig | None = None,
            *, judge_fn=None, heldout_examples=(), active_adapter: str | None = None) -> dict:
    """Evaluate `model`'s trained adapter ("default") against the active version.

    `model` is a `PeftModel`; `settings` the serving `GenerationSettings`;
    `reward_fn` the reward model PPO optimized, `judge_fn` one it did not
    (None: no judge); `active_adapter` the directory of the active version's
    adapter, or None when the base (v0) is active.
    """
    config = config or EvalConfig()
    prompts = prompts[: config.max_prompts]
    samples = samples_per_prompt(len(prompts), config)
    prompts = [p for p in prompts for _ in range(samples)]
    if not prompts:
        return {"prompts": 0, "win_rate": None, "kl_to_base": None, "kl_per_token": None, "nan": False}
    was_training = model.training
    model.eval()
    active = ACTIVE if active_adapter else None
    try:
        if active_adapter:
            model.load_adapter(str(active_adapter), adapter_name=ACTIVE)
        cand = _version_replies(model, tokenizer, prompts, settings, config, CANDIDATE, samples)
        act = _version_replies(model, tokenizer, prompts, settings, config, active, samples)
        base = act if active is None else _version_replies(model, tokenizer, prompts, settings, config, None, samples)
        thumbs = heldout_thumbs_margin(model, tokenizer, list(heldout_examples), active, config.max_heldout_thumbs)
    finally:
        if active_adapter and ACTIVE in getattr(model, "peft_config", {}):
            model.set_adapter(CANDIDATE)
            model.delete_adapter(ACTIVE)
        model.set_adapter(CANDIDATE)
        model.train(was_training)
    cand_scores = reward_fn(prompts, cand["texts"])
    act_scores = reward_fn(prompts, act["texts"])
    judged = judge_fn is not None
    judge_cand = judge_fn(prompts, cand["texts"]) if judged else []
    judge_act = judge_fn(prompts, act["texts"]) if judged else []
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    numbers = [*cand_scores, *act_scores, *judge_cand, cand["kl_to_base"], cand["base_nll"] or 0.0,
               cand["excess_nll"] or 0.0]
    return {
        "prompts": len(prompts) // samples,
        "samples": len(prompts),
        "samples_per_prompt": samples,
        "win_rate": win_rate(cand_scores, act_scores),
        "reward": mean(cand_scores),
        "active_reward": mean(act_scores),
        "win_rate_se": win_rate_se(cand_scores, act_scores, samples),
        "judge_win_rate": win_rate(judge_cand, judge_act) if judged else None,
        "judge_win_rate_se": win_rate_se(judge_cand, judge_act, samples) if judged else None,
        "judge_reward": mean(judge_cand),
        "active_judge_reward": mean(judge_act),
        "heldout_thumbs": thumbs,
        "kl_to_base": cand["kl_to_base"],
        "kl_per_token": cand["kl_per_token"],
        "active_kl_to_base": act["kl_to_base"],
        "active_kl_per_token": act["kl_per_token"],
        "base_nll": {"candidate": cand["base_nll"], "active": act["base_nll"], "base": base["base_nll"]},
        "excess_nll": {"candidate": cand["excess_nll"], "active": act["excess_nll"], "base": base["excess_nll"]},
        "known_words": {"candidate": cand["known_words"], "active": act["known_words"],
                        "base": base["known_words"]},
        "nan": not all(math.isfinite(x) for x in numbers),
        "candidate": cand["stats"],
        "active": act["stats"],
        "base": base["stats"],
        "examples": [
            {"prompt": p[-1]["content"], "candidate": c, "active": a}
            for p, c, a in list(zip(prompts, cand["texts"], act["texts"]))[: config.examples * samples:samples]
        ],
    }
