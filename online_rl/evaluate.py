"""Candidate against active on held-out prompts.

Both versions reply to the same held-out prompts (same sampling seed); the
reward model judges each pair of replies. Reported:

- ``win_rate``: share of prompts where the candidate's reply scores higher
  (ties count half);
- ``kl_to_base``: mean over replies of ``sum_t log pi(t) - log base(t)`` on the
  candidate's own samples, a Monte-Carlo estimate of KL(candidate || base) per
  reply, in nats; the same for the active version;
- signs of degenerate replies: share of distinct replies, share of the most
  common reply, share of empty replies, share cut off without an
  end-of-sequence token, mean words per reply;
- a few replies side by side, to be read, not just counted.

The evaluation gate decides from these numbers; this module only
measures.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from online_rl.sampling import reply_logprobs, sample_many

CANDIDATE, ACTIVE = "default", "active"


@dataclass
class EvalConfig:
    max_prompts: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0  # KL is estimated on samples from the model's own distribution
    seed: int = 1234
    examples: int = 6  # replies shown side by side in the metrics


def reply_stats(texts: list[str], finished: list[bool]) -> dict:
    n = max(1, len(texts))
    counts = Counter(texts)
    return {
        "distinct_fraction": round(len(counts) / n, 4),
        "top_reply_share": round(counts.most_common(1)[0][1] / n, 4) if texts else 0.0,
        "empty_fraction": round(sum(not t.strip() for t in texts) / n, 4),
        "cut_off_fraction": round(sum(not f for f in finished) / n, 4),
        "mean_words": round(sum(len(t.split()) for t in texts) / n, 2),
    }


def _samples_and_kl(model, tokenizer, prompts, config: EvalConfig, adapter: str | None):
    """Sample with the named adapter (None: the base) and estimate KL to the base."""
    torch.manual_seed(config.seed)
    if adapter is None:
        with model.disable_adapter():
            batches = sample_many(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                  temperature=config.temperature)
        kls = [0.0] * len(prompts)
    else:
        model.set_adapter(adapter)
        batches = sample_many(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature)
        kls = []
        for batch in batches:
            own = reply_logprobs(model, batch, config.temperature)
            with model.disable_adapter():
                base = reply_logprobs(model, batch, config.temperature)
            kls.extend((own - base).sum(-1).tolist())
    texts = [t for b in batches for t in b["texts"]]
    finished = [bool(f) for b in batches for f in b["finished"].tolist()]
    return texts, finished, kls


def compare(model, tokenizer, prompts: list[list[dict]], reward_fn, config: EvalConfig | None = None,
            *, active_adapter: str | None = None) -> dict:
    """Evaluate `model`'s trained adapter ("default") against the active version.

    `model` is a `PeftModel`; `active_adapter` is the directory of the active
    version's adapter, or None when the base (v0) is active.
    """
    config = config or EvalConfig()
    prompts = prompts[: config.max_prompts]
    if not prompts:
        return {"prompts": 0, "win_rate": None, "kl_to_base": None, "nan": False}
    was_training = model.training
    model.eval()
    try:
        cand_texts, cand_done, cand_kl = _samples_and_kl(model, tokenizer, prompts, config, CANDIDATE)
        if active_adapter:
            model.load_adapter(str(active_adapter), adapter_name=ACTIVE)
            act_texts, act_done, act_kl = _samples_and_kl(model, tokenizer, prompts, config, ACTIVE)
        else:
            act_texts, act_done, act_kl = _samples_and_kl(model, tokenizer, prompts, config, None)
    finally:
        if active_adapter and ACTIVE in getattr(model, "peft_config", {}):
            model.set_adapter(CANDIDATE)
            model.delete_adapter(ACTIVE)
        model.set_adapter(CANDIDATE)
        model.train(was_training)
    cand_scores = reward_fn(prompts, cand_texts)
    act_scores = reward_fn(prompts, act_texts)
    wins = sum(1.0 if c > a else 0.5 if c == a else 0.0 for c, a in zip(cand_scores, act_scores))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    numbers = [*cand_scores, *act_scores, *cand_kl]
    return {
        "prompts": len(prompts),
        "win_rate": round(wins / len(prompts), 4),
        "reward": round(mean(cand_scores), 4),
        "active_reward": round(mean(act_scores), 4),
        "kl_to_base": round(mean(cand_kl), 4),
        "active_kl_to_base": round(mean(act_kl), 4),
        "nan": not all(math.isfinite(x) for x in numbers),
        "candidate": reply_stats(cand_texts, cand_done),
        "active": reply_stats(act_texts, act_done),
        "examples": [
            {"prompt": p[-1]["content"], "candidate": c, "active": a}
            for p, c, a in list(zip(prompts, cand_texts, act_texts))[: config.examples]
        ],
    }
