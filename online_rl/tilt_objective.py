"""The tilt's objective: what each of the policy's own replies is worth, and
the loss that distills those weights into the adapter.

Within each prompt's group of sampled replies, a weight from the softmax of
the reward model's standardized score over `beta`, less the language weight
times the reply's excess NLL per token (`tilt_weights`); no reply the
target for more than a small share of the prompts (`reply_share_cap`); and
per minibatch the weighted NLL at the choice tokens, the base held at the
others, and served words outside the base's nucleus charged (`step_loss`).
`online_rl.tilt` runs the cycle around them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from online_rl.language import outside_cost
from online_rl.sampling import full_inputs

if TYPE_CHECKING:
    from online_rl.tilt import TiltConfig


def tilt_weights(scores: torch.Tensor, excess: torch.Tensor, usable: torch.Tensor, group: int, beta: float,
                 language_coef: float, min_spread: float = 0.0) -> torch.Tensor:
    """Each reply's weight within its prompt's `group` of replies: a softmax
    of standardized score / beta - language_coef * `excess` (its excess NLL per
    token, `online_rl.language.drawn_excess`); replies
    that are not `usable` get 0, and so does a group without a usable one,
    or whose usable replies' standardized scores span less than `min_spread`."""
    z = (scores - scores[usable].mean()) / scores[usable].std().clamp(min=1e-6) if usable.sum() > 1 else \
        torch.zeros_like(scores)
    logits = (z / beta - language_coef * excess).masked_fill(~usable, -math.inf).view(-1, group)
    spread = (z.masked_fill(~usable, -math.inf).view(-1, group).amax(-1)
              - z.masked_fill(~usable, math.inf).view(-1, group).amin(-1))
    live = usable.view(-1, group).any(-1, keepdim=True) & (spread >= min_spread).unsqueeze(-1)
    weights = torch.softmax(logits.masked_fill(~live, 0.0), -1) * live
    return weights.reshape(-1)


def reply_share_cap(weights: torch.Tensor, texts: list[str], prompt_keys: list[str], group: int,
                    max_share: float | None) -> torch.Tensor:
    """`weights` (groups of `group` replies, one group per drawn prompt,
    `prompt_keys` naming each group's prompt) with every distinct reply's
    total weight held to `max_share` of the distinct prompts that teach
    anything (at least one prompt's worth). A prompt drawn several times
    counts once: its groups' weights are averaged. A reply over the cap has
    its weight scaled down wherever it occurs; nothing is handed to the
    other replies, so a prompt that had only that reply to teach teaches
    less. Measured on `computers`: without it the tilt's targets were a few
    stock replies said to prompts they do not answer, and the gate turned
    its candidates away (docs/learning.md, "One reply for many prompts")."""
    if max_share is None:
        return weights
    groups = weights.view(-1, group)
    draws: dict[str, int] = {}
    for key in prompt_keys:
        draws[key] = draws.get(key, 0) + 1
    teaching = {key for key, live in zip(prompt_keys, (groups.sum(-1) > 0).tolist()) if live}
    cap = max(1.0, max_share * len(teaching))
    totals: dict[str, float] = {}
    for g, key in enumerate(prompt_keys):
        for j, w in enumerate(groups[g].tolist()):
            if w > 0:
                text = texts[g * group + j].strip()
                totals[text] = totals.get(text, 0.0) + w / draws[key]
    scale = torch.tensor([min(1.0, cap / totals[t.strip()]) if t.strip() in totals else 1.0 for t in texts])
    return weights * scale


def _forward_logp(model, batch):
    ids, mask, positions, start = full_inputs(batch)
    keep = ids.shape[1] - start + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return torch.log_softmax(logits[:, -keep:-1].float(), -1)


def step_loss(policy, batch: dict, weights: torch.Tensor, config: TiltConfig, settings,
              outside_coef: float) -> tuple[torch.Tensor, dict]:
    """The weighted NLL at the choice tokens, the anchor elsewhere, and the
    served words the base would never serve (at `outside_coef`), for one minibatch."""
    with torch.no_grad(), policy.disable_adapter():
        teacher = _forward_logp(policy, batch)
    student = _forward_logp(policy, batch)
    mask = batch["reply_mask"].float()
    entropy = -(teacher.exp() * teacher).sum(-1)
    choice = mask * (entropy > config.choice_entropy).float()
    rest = mask - choice
    logp = student.gather(-1, batch["reply"].unsqueeze(-1)).squeeze(-1)
    per_reply = (logp * choice).sum(-1)
    weighted_tokens = (weights * choice.sum(-1)).sum().clamp(min=1e-6)
    nll = -(weights * per_reply).sum() / weighted_tokens
    kl = ((teacher.exp() * (teacher - student)).sum(-1) * rest).sum() / rest.sum().clamp(min=1)
    outside = outside_cost(student, teacher, mask, settings)
    loss = nll + config.anchor_coef * kl + outside_coef * outside
    return loss, {"choice_nll": nll.item(), "anchor_kl": kl.item(), "outside": outside.item(),
                  "choice_share": (choice.sum() / mask.sum().clamp(min=1)).item()}
