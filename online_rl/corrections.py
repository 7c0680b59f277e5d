"""Corrections in a tilt cycle: the reply a person wrote in place of the
bot's, weighed beside the policy's own replies to the same prompt by the
tilt's own rule (`online_rl.tilt`), so that a correction in the base's
language becomes its prompt's target and one far from it does not pull the
policy off its language."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from online_rl.language import reply_excess
from online_rl.sampling import encode_replies, sample_many

if TYPE_CHECKING:
    from online_rl.tilt import TiltConfig


def correction_groups(policy, tokenizer, corrections: list[tuple[list[dict], str]], rater_weights, reward_fn,
                      settings, config: "TiltConfig", center, reference_nll: float) -> tuple[list, list[str], torch.Tensor]:
    """Corrections as training rows: (chats, texts, weights), in groups of
    `samples_per_prompt` of the policy's replies to a correction's prompt
    followed by the correction.

    A correction (the reply a person wrote in place of the bot's) is one
    more reply to its prompt, weighed by the tilt's own rule: its
    reward-model score, taken as at least that of the best of the policy's
    replies (the person preferred it to the bot's), less `language_coef`
    times its excess NLL per token. So a correction in the base's language
    is the prompt's target, and one far from it (a person's own words, a
    reply written for another prompt) hands its weight to the policy's own
    replies the reward model likes, instead of pulling the policy off its
    language: trained on as plain targets, corrections moved the base NLL
    per token past the gate's bound (docs/learning.md). Each group weighs
    `correction_coef` times its rater-bound weight over their mean. No
    `min_spread` here: a correction is a preference stated. Where none of
    the policy's replies is usable (all cut off, or empty), the correction
    is weighed against a typical reply of the cycle (`reference_nll`, the
    median excess NLL per token of its usable replies), scored alike: it keeps
    the share it would take from that. `center`: the mean and standard
    deviation the cycle's scores are standardized with."""
    k = config.samples_per_prompt
    prompts = [p for p, _ in corrections]
    batches = sample_many(policy, tokenizer, [p for p in prompts for _ in range(k)], settings,
                          batch_size=config.sample_batch, max_prompt_tokens=config.max_prompt_tokens)
    sampled = [t for b in batches for t in b["texts"]]
    finished = [bool(f) for b in batches for f in b["finished"].tolist()]
    chats, texts, usable = [], [], []
    for i, (prompt, correction) in enumerate(corrections):
        own = slice(i * k, (i + 1) * k)
        chats += [prompt] * (k + 1)
        texts += sampled[own] + [correction]
        usable += [bool(t.strip()) and f for t, f in zip(sampled[own], finished[own])] + [bool(correction.strip())]
    device = next(policy.parameters()).device
    encoded = [encode_replies(tokenizer, chats[i:i + config.sample_batch], texts[i:i + config.sample_batch],
                              max_length=config.max_prompt_tokens, device=device)
               for i in range(0, len(texts), config.sample_batch)]
    excess = reply_excess(policy, encoded, settings).view(-1, k + 1)
    usable = torch.tensor(usable).view(-1, k + 1)
    mean, std = center
    z = ((torch.tensor(reward_fn(chats, texts), dtype=torch.float32) - mean) / max(float(std), 1e-6)).view(-1, k + 1)
    best_own = z[:, :k].masked_fill(~usable[:, :k], -math.inf).amax(-1)
    z[:, k] = torch.maximum(z[:, k], best_own)
    logits = (z / config.beta - config.language_coef * excess).masked_fill(~usable, -math.inf)
    live = usable.any(-1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(~live, 0.0), -1) * live
    alone = ~usable[:, :k].any(-1)
    weights[alone, k] = torch.sigmoid(config.language_coef * (reference_nll - excess[alone, k])) * usable[alone, k]
    raters = torch.tensor(rater_weights or [1.0] * len(corrections), dtype=torch.float32)
    weights = weights * (config.correction_coef * raters / raters.mean().clamp(min=1e-6)).unsqueeze(-1)
    return chats, texts, weights.reshape(-1)
