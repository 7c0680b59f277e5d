"""Tilt: the policy's own replies, re-weighted towards what people like.

The KL-regularized objective of RLHF, ``max E[r] - beta * KL(policy || base)``,
has a closed-form optimum: ``policy*(y|x) ∝ base(y|x) * exp(r(x, y) / beta)``
(Rafailov et al. 2023, eq. 4; Korbak et al. 2022). A tilt cycle builds that
distribution on the policy's own replies and distills it into the LoRA
adapter directly, where PPO approaches it by small policy-gradient steps:

1. **Samples.** `prompts` prompts drawn from the pool by their rater-bound
   weights, each answered `samples_per_prompt` times by the policy (the
   active version) at the serving settings.
2. **Weights.** Each reply's reward-model logit, standardized over the
   cycle's replies and divided by `beta`, minus `language_coef` times the
   reply's excess NLL per token (the base's NLL of its tokens less what the
   base's own choices cost at the same positions, `online_rl.language`);
   then a softmax over each prompt's replies. The plain NLL per token would
   weigh length as well as language: a short reply's tokens are the
   uncertain first ones, and the term worked against a taste for short
   replies. Replies cut off at the reply cap, and empty ones, get no weight,
   and so do prompts whose replies all score alike (within `min_spread`
   standard deviations): they teach no taste. No reply is the target for
   more than a small share of the cycle's prompts (`reply_share_cap`):
   above it its weight is dropped where it occurs, so that a stock reply
   the taste likes anywhere is not taught for every prompt it was sampled for.
   Only replies the policy writes itself are re-weighted, so the target is
   in its language: on the starter the exact tilt of the base's own replies
   gains +0.2 to +0.4 approval on six tastes at the base's own NLL per
   token (docs/learning.md).
3. **Choice tokens.** A reply is chosen at a few tokens, where the base is
   unsure (entropy above `choice_entropy` nats): how it opens, whether it
   stops or goes on. Elsewhere the base continues a reply it knows. The
   weighted NLL is taken at the choice tokens only; at every other token the
   policy is held to the base's whole next-token distribution
   (KL(base || policy), weight `anchor_coef`). Taken at every token, the
   weighted NLL also raises the sampler's rare slips, and the starter turns
   to babble (measured on `long` with the true taste as the reward: base NLL
   per token 0.40 -> 0.60 in three epochs, against 0.41 -> 0.47 here).
   At every reply token, the words the policy would serve that the base
   never would (outside the base's nucleus at the serving settings) are
   penalized at their base NLL (`language.outside_cost`, weight
   `outside_coef`): three quarters of what the tilt cost the language on
   held-out prompts was there, not in its choices among the base's words.
4. **Epochs, stopped by language.** After each epoch the policy answers the
   validation prompts (kept out of training; in a cycle, the very prompts
   the gate will judge on: `online_rl.cycle.judged_prompts`); of the
   epochs whose replies' excess NLL per token is at most `max_nll_increase`
   of the base's own NLL per token above that of the base's own replies to
   the same prompts (0 by definition), and whose KL to the base, its most
   common reply and its share of distinct replies are within the gate's
   bounds too, each a tenth inside the gate's (`online_rl.epoch_bounds`, the validation
   replies are fewer than the gate's), the one with the best reward-model
   score there is kept (`epoch_rank`). The language stop was half the
   gate's once; with a figure that no longer rises for short replies nor
   falls for long ones, at half it kept only each cycle's first, smallest
   epoch, and the gate accepted the ones it turned away (docs/learning.md).
   A prompt is a validation prompt in every cycle or in none (a hash of
   it), so none was learned by heart in an earlier one. When no epoch
   stays within the language bound, the cycle starts again from its parent
   with `language_coef` and `outside_coef` doubled (at most
   `language_retries` times): the replies chosen are then those the taste
   likes that keep closest to the base's language.

`grow_tilt` can tilt a second time within a cycle, on fresh replies of the
version the first tilt kept (`TiltConfig.grow_steps`; off by default: it
gained no more through the whole loop, docs/learning.md "Two tilts a cycle").

Each cycle continues from the active version's adapter, as PPO does, and
tilts it further by the newest reward model (trained on all the replayed
thumbs): the "Improve" step of ReST (Gulcehre et al. 2023), repeated as
thumbs arrive. Started afresh from the base each cycle, a candidate was only
as far from the base as the one before it, and lost to it (measured on
`long`: win rate 0.49). Language is always judged against the base, by the
epoch stop here and by the gate, so drift cannot build up round after round.

Why our own loop: no maintained trainer takes per-reply weights with a
per-token split between a weighted NLL and a distillation term. TRL's
`SFTTrainer` has no per-example weights; its `DPOTrainer` and `KTOTrainer`
also push the disliked replies' tokens down, which on a peaked small model
hands their probability to whatever else the vocabulary holds (babble, see
`online_rl.ppo`'s `negative_weight`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from typing import Callable

import torch

from online_rl.data import is_heldout
from online_rl.corrections import correction_groups
from online_rl.influence import weighted_draw
from online_rl.epoch_bounds import epoch_rank, judge_epoch, validation_limits
from online_rl.language import reply_excess
from online_rl.sampling import encode_replies, sample_many
from online_rl.tilt_objective import reply_share_cap, step_loss, tilt_weights
from storage.common import prompt_hash

RewardFn = Callable[[list[list[dict]], list[str]], list[float]]
ProgressFn = Callable[[str], None]


@dataclasses.dataclass
class TiltConfig:
    prompts: int = 512  # prompts drawn from the pool per cycle (by their rater-bound weights)
    samples_per_prompt: int = 8  # the policy's replies to each, re-weighted
    beta: float = 0.5  # temperature of the tilt, in standard deviations of the reward-model logits
    # Weight of language in the tilt: each reply's log-weight loses this many
    # times its excess NLL per token, so that among replies the taste likes
    # as much the better-formed one is chosen.
    language_coef: float = 2.0
    # When no epoch stays within the language bound, the cycle starts again
    # from its parent with `language_coef` this many times higher, at most
    # `language_retries` times: a tilt that asks less of the language. A
    # cycle continues from the active version, whose replies may already be
    # near the bound; at a fixed weight, from the second round of `long` on
    # even the first epoch passed it and the gate turned the candidate away
    # (docs/learning.md).
    language_step: float = 2.0
    language_retries: int = 2
    # Weight of each correction's group (the reply a person wrote in place of
    # the bot's, beside the policy's own replies to that prompt, tilted
    # together: `correction_groups`), relative to one prompt's tilted replies
    # (whose weights sum to 1), scaled by its rater-bound weight.
    correction_coef: float = 1.0
    # A prompt whose replies' standardized scores span less than this teaches
    # no taste, only which reply the base finds likeliest: it is left out.
    # Kept in, such prompts pulled the policy towards its likeliest replies
    # and held the taste back (on `long` with the taste as the reward: +0.05
    # approval after 3 epochs, against +0.19 without them; docs/learning.md).
    min_spread: float = 0.5
    choice_entropy: float = 0.5  # nats: base positions less certain than this are where replies are chosen
    anchor_coef: float = 8.0  # weight of KL(base || policy) at the other positions
    # Weight of `language.outside_cost` at every reply position: the served
    # words the base would never serve (outside its own nucleus), at their
    # base NLL. Most of what a tilt cost the language was there, not in its
    # choices among the base's words: on `long` (the taste as the reward,
    # 512 prompts, 3 epochs, 128 held-out prompts x 12; benchmarks/bench_tilt.py)
    # 0.39 approval at excess NLL +0.067 per token without it, 0.32 at +0.028
    # with it (base 0.23): less per tilt, more per unit of what the gate bounds.
    outside_coef: float = 16.0
    epochs: int = 3
    # Tilts per cycle (`grow_tilt`): each samples fresh replies of the
    # version the one before kept and tilts them again by the same reward
    # model, while the kept epoch stays within the bounds and its validation
    # score rises. With the taste itself as the reward (`concise`, 838
    # prompts) a second tilt took 0.73 to 0.79; through the whole loop, on
    # reward models learned from thumbs, it gained no more than one tilt a
    # cycle (+0.06 against +0.07 to +0.13) at half as much time again per
    # cycle, so one is the default (docs/learning.md, "Two tilts a cycle").
    grow_steps: int = 1
    minibatch: int = 16  # replies per gradient step
    # Replies sampled at once: a PPO step's rollouts (4 x 16), which the
    # memory plan counts for a retrain (chatbot/memory.py).
    sample_batch: int = 64
    lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    validation_share: float = 0.2  # of the drawn prompts, kept out of training to stop on language
    # Replies sampled on the validation prompts after each epoch (spread over
    # them): base NLL per token varies a lot from reply to reply. With 128
    # the epoch stop passed an epoch at 0.42 that the gate measured at 0.54;
    # the gate writes at least 1024 (`EvalConfig.min_replies`), and its bounds
    # are a tenth wider than the stop's (`epoch_bounds.within_gate`).
    validation_replies: int = 256
    # (With fewer than 20 prompts in the pool there is nothing to keep out:
    # the epoch stop then looks at training prompts.)
    # The epoch stop: excess NLL per token at most this share of the base's
    # own NLL per token above the base's own replies'. Like the bounds below,
    # set from the gate's by the cycle (`within_gate`); None: not bounded.
    max_nll_increase: float | None = None
    # The gate's other bounds, on the validation replies: KL to the base per
    # reply token, the share of the most common reply, the share of
    # distinct replies (one reply per prompt; as a share of the base's own)
    # and how much more of the prompts the ten most common take than the
    # base's ten. An epoch past any of them is outside the bounds, as one
    # that drifted. The cycle sets them from the gate's, with a tenth of
    # margin (`within_gate`), so that a cycle hands the gate the best epoch
    # it can pass rather than one it will reject for its KL or for one reply
    # spread over the prompts. None: not bounded.
    max_kl: float | None = None
    max_top_share: float | None = None
    min_distinct: float | None = None
    max_top_ten_increase: float | None = None
    # Each distinct reply's tilt weight, summed over the cycle's distinct
    # prompts, at most this share of them (at least one prompt's worth): a
    # reply the taste likes anywhere is the target for a few prompts, not
    # for every prompt it was sampled for. Above the cap its weight is
    # scaled down where it occurs (`reply_share_cap`), and those prompts
    # teach less. The cycle sets it from the gate's bound on the ten most
    # common replies (`within_gate`: a tenth of it each, with the margin),
    # so that ten replies together stay within it. None: not capped.
    max_reply_share: float | None = None
    max_prompt_tokens: int = 256
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> "TiltConfig":
        if min(self.prompts, self.epochs, self.minibatch, self.validation_replies, self.grow_steps) < 1:
            raise ValueError("tilt prompts, epochs, grow steps, minibatch and validation samples must be at least 1")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2: a tilt chooses among the base's replies")
        if self.anchor_coef < 0 or self.outside_coef < 0 or self.language_coef < 0:
            raise ValueError("the tilt's language and anchor weights must not be negative")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError("the tilt's beta and learning rate must be positive")
        if self.language_step < 1 or self.language_retries < 0:
            raise ValueError("language_step must be at least 1 and language_retries at least 0")
        if not 0 <= self.validation_share < 1:
            raise ValueError("validation_share is a share of the prompts: from 0 to below 1")
        return self


def _sample(policy, tokenizer, prompts, settings, config, base: bool):
    """Replies of the policy, or of its base (`base`: the adapter disabled)."""
    with policy.disable_adapter() if base else contextlib.nullcontext():
        return sample_many(policy, tokenizer, prompts, settings, batch_size=config.sample_batch,
                           max_prompt_tokens=config.max_prompt_tokens)


def validation_split(prompts: list[list[dict]], share: float) -> list[bool]:
    """Which of the pool's prompts are the tilt's validation prompts: a hash
    of each decides, the same in every cycle, so no tilt ever trains on
    them (and the gate judges on them too, `online_rl.cycle`). None while
    the pool holds fewer than 20 prompts: there is nothing to keep out."""
    if len(prompts) < 20:
        return [False] * len(prompts)
    return [is_heldout("tilt-validation:" + prompt_hash(p), share) for p in prompts]


def train_tilt(policy, tokenizer, prompts: list[list[dict]], reward_fn: RewardFn, settings, config: TiltConfig, *,
               prompt_weights: list[float] | None = None, corrections: list[tuple[list[dict], str]] | None = None,
               correction_weights: list[float] | None = None, validation: list[list[dict]] | None = None,
               progress: ProgressFn = print) -> dict:
    """Train `policy` (a trainable `PeftModel`: a fresh adapter, or the
    active version's) towards its own replies tilted by `reward_fn`; returns
    the metrics. The adapter kept is that of the epoch with the best
    validation score among those whose replies' base NLL per token is within
    `config.max_nll_increase` of the base's own and that stay within
    `config`'s KL and repetition bounds (else the closest).
    `corrections` (prompt, the reply a person wrote instead) join the
    training rows beside the policy's own replies to their prompts
    (`correction_groups`), weighed by `correction_weights` (the rater
    bound's). `validation`: the prompts the epoch stop judges on (the
    cycle passes the gate's, `online_rl.cycle.judged_prompts`); none of them
    is trained on. None: the pool's own validation split (`validation_split`)."""
    config.validate()
    if not prompts:
        raise ValueError("a tilt needs at least one prompt to sample replies to")
    started = time.perf_counter()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    k = config.samples_per_prompt
    # Validation prompts (the pool's split below, and in a cycle also the
    # gate's held-out prompts) are kept out of training, in this cycle and
    # every other: the split is a hash of the prompt, because each cycle continues
    # from the last one's adapter, and a prompt trained on before would show
    # replies learned by heart (measured on `long`: 0.34 nats per token on
    # such prompts against the base's 0.45, where new prompts gave 0.51).
    # The training prompts are then drawn by their weights (a heavily
    # weighted prompt may be drawn more than once: more replies to choose among).
    held = validation_split(prompts, config.validation_share)
    if validation:  # the gate's prompts: kept out of training as well
        judged = {prompt_hash(p) for p in validation}
        held = [h or prompt_hash(p) in judged for p, h in zip(prompts, held)]
    else:
        validation = [p for p, h in zip(prompts, held) if h]
    pool = [i for i, h in enumerate(held) if not h]
    if not pool or not validation:  # too few prompts to keep any out: the stop looks at training prompts
        pool = list(range(len(prompts)))
        validation = validation or [prompts[i] for i in rng.sample(pool, min(16, len(prompts)))]
    weights_of = prompt_weights or [1.0] * len(prompts)
    train = weighted_draw([prompts[i] for i in pool], [weights_of[i] for i in pool], config.prompts, rng)
    policy.eval()
    progress(f"tilt: sampling {k} replies to each of {len(train)} prompts")
    batches = _sample(policy, tokenizer, [p for p in train for _ in range(k)], settings, config, base=False)
    texts = [t for b in batches for t in b["texts"]]
    chats = [p for b in batches for p in b["prompts"]]
    usable = torch.tensor([bool(t.strip()) and f for b in batches for t, f in zip(b["texts"], b["finished"].tolist())])
    excess = reply_excess(policy, batches, settings)
    scores = torch.tensor(reward_fn(chats, texts), dtype=torch.float32)
    keys = [prompt_hash(p) for p in train]

    capped: dict = {}

    def weigh(language_coef: float) -> torch.Tensor:
        tilted = tilt_weights(scores, excess, usable, k, config.beta, language_coef, config.min_spread)
        held = reply_share_cap(tilted, texts[:len(keys) * k], keys, k, config.max_reply_share)
        capped["share"] = round(1.0 - float(held.sum()) / max(1e-6, float(tilted.sum())), 4)
        return held

    weights = weigh(config.language_coef)
    policy_rows = len(weights)
    groups = weights.view(-1, k)
    live = groups.sum(-1) > 0
    groups = groups / groups.sum(-1, keepdim=True).clamp(min=1e-12)  # each prompt's choice (a cap leaves less than 1)
    effective = (1.0 / (groups[live] ** 2).sum(-1)).mean().item() if live.any() else 0.0
    target_score = ((groups * scores.view(-1, k)).sum(-1)[live].mean().item() if live.any() else None)
    sampled_score = scores[usable].mean().item() if usable.any() else None
    progress(f"tilt: {int(live.sum())} prompts with a usable reply; mean reward-model score {_fmt(sampled_score)} "
             f"of the sampled replies, {_fmt(target_score)} under the tilt; {effective:.1f} effective replies "
             f"of {k} per prompt; the cap on one reply's share of the prompts took {capped['share']:.0%} of the "
             "tilt's weight off replies said to many")

    per_prompt = max(1, math.ceil(config.validation_replies / len(validation)))
    val_prompts = [p for p in validation for _ in range(per_prompt)]
    base_val = _sample(policy, tokenizer, val_prompts, settings, config, base=True)
    limits = validation_limits(policy, base_val, per_prompt, settings, config)
    bound = limits["bound"]
    start_val = _sample(policy, tokenizer, val_prompts, settings, config, base=False)
    start_score = _mean(reward_fn([p for b in start_val for p in b["prompts"]],
                                  [t for b in start_val for t in b["texts"]]))
    progress(f"tilt: validation on {len(validation)} prompts: base NLL per token {limits['base_nll']}, excess NLL "
             f"per token bound {bound:+.3f}")

    correction_share = None
    if corrections and config.correction_coef > 0:
        center = (scores[usable].mean(), scores[usable].std()) if usable.sum() > 1 else (scores.mean(), 1.0)
        reference = float(excess[usable].median()) if usable.any() else float(excess.median())
        extra = correction_groups(policy, tokenizer, corrections, correction_weights, reward_fn, settings, config,
                                  center, reference)
        chats, texts, weights = chats + extra[0], texts + extra[1], torch.cat([weights, extra[2]])
        correction_share = round(float(extra[2][k::k + 1].sum()) / max(1e-6, float(extra[2].sum())), 4)
        progress(f"tilt: {len(corrections)} corrections, each beside {k} of the policy's replies to its prompt; "
                 f"the corrections hold {correction_share:.0%} of those prompts' weight")
    params = [p for p in policy.parameters() if p.requires_grad]
    device = next(policy.parameters()).device
    parent = _trainable(policy)
    history, kept, kept_state, kept_record, best, coef = [], 0, None, None, None, config.language_coef
    for attempt in range(config.language_retries + 1):
        outside_coef = config.outside_coef * config.language_step ** attempt
        if attempt:  # again from the parent, asking less of the language
            coef *= config.language_step
            weights = torch.cat([weigh(coef), weights[policy_rows:]])
            _restore(policy, parent)
            progress(f"tilt: no epoch stayed within the language bound; again from where the cycle "
                     f"started, with the language weighed {coef:g} in the weights (was "
                     f"{coef / config.language_step:g}) and {outside_coef:g} in the loss")
        rows = [i for i in range(len(texts)) if weights[i] > 1e-4]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        for epoch in range(1, config.epochs + 1):
            rng.shuffle(rows)
            policy.train()
            sums = {"choice_nll": 0.0, "anchor_kl": 0.0, "outside": 0.0, "choice_share": 0.0}
            steps = 0
            for i in range(0, len(rows), config.minibatch):
                idx = rows[i:i + config.minibatch]
                batch = encode_replies(tokenizer, [chats[j] for j in idx], [texts[j] for j in idx],
                                       max_length=config.max_prompt_tokens, device=device)
                loss, parts = step_loss(policy, batch, weights[idx].to(device), config, settings, outside_coef)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                steps += 1
                for key, value in parts.items():
                    sums[key] += value
            policy.eval()
            record = {"epoch": epoch, "steps": steps, **{key: round(v / max(1, steps), 4) for key, v in sums.items()},
                      **judge_epoch(policy, _sample(policy, tokenizer, val_prompts, settings, config, base=False),
                                    per_prompt, reward_fn, settings, config, limits),
                      "language_coef": coef, "seconds": round(time.perf_counter() - started, 1)}
            val_excess, within = record["val_excess_nll"], record["within_bound"]
            history.append(record)
            progress(f"tilt: epoch {epoch}/{config.epochs}: reward-model score {_fmt(record['val_score'])} on "
                     f"validation (at the start {_fmt(start_score)}), excess NLL per token {val_excess} (bound "
                     f"{bound:+.3f}; plain {record['val_nll']}), KL to the base {record['val_kl']} per token (bound "
                     f"{_bound(config.max_kl)}), most common reply {record['val_top_reply_share']:.0%} and "
                     f"{record['val_distinct']:.0%} distinct, ten most common {record['val_top_ten_share']:.0%} "
                     f"(bounds {_bound(config.max_top_share)}, {limits['floor']:.2f}, "
                     f"{_top_ten_bound(config, limits)}), known words {record['val_known_words']} "
                     f"({record['seconds']:.0f} s)")
            rank = epoch_rank(record)
            if best is None or rank > best:
                best, kept, kept_record = rank, epoch, record
                kept_state = _trainable(policy)
            elif best[0] and not within:
                break  # past the bound after an epoch within it: later epochs would drift further
        if best[0] or kept_record["language_over"] <= 1:
            break  # an epoch within the bounds, or the closest one past a bound other than the language's
    if kept_state is not None:
        _restore(policy, kept_state)
    if not best[0]:
        progress(f"tilt: no epoch stayed within the bounds (language, KL, repetition); epoch {kept}, the closest, "
                 "is kept for the gate to judge")
    else:
        progress(f"tilt: epoch {kept} kept: the best reward-model score on validation within the bounds")
    return {"method": "tilt", "prompts": len(train), "validation_prompts": len(validation),
            "replies": int(usable.numel()), "usable_replies": int(usable.sum()),
            "corrections": len(corrections or []) if config.correction_coef > 0 else 0,
            "correction_share": correction_share, "effective_replies": round(effective, 2),
            "reply_cap_share": capped["share"],
            "score_sampled": _round(sampled_score), "score_target": _round(target_score),
            "validation": {"start_score": start_score, "base_nll": limits["base_nll"],
                           "base_excess_nll": limits["base_excess"], "base_known_words": limits["base_known"],
                           "excess_nll_bound": round(bound, 4) if math.isfinite(bound) else None, "kl_bound": config.max_kl,
                           "base_distinct": limits["base_distinct"], "base_top_ten": limits["base_top_ten"]},
            "history": history, "epochs": len(history), "epoch_kept": kept, "kept": kept_record,
            "language_coef": kept_record["language_coef"] if kept_record else config.language_coef, "seconds": round(time.perf_counter() - started, 1)}


def grow_tilt(policy, tokenizer, prompts: list[list[dict]], reward_fn: RewardFn, settings, config: TiltConfig, *,
              progress: ProgressFn = print, **kwargs) -> dict:
    """`train_tilt` up to `config.grow_steps` times, each on fresh replies of
    the version the one before kept: ReST's Grow and Improve steps repeated
    within a cycle, on one reward model. A further tilt is tried only while
    the kept epoch is within the bounds, and kept only if it stays within
    them and scores higher on the validation prompts than the version it
    started from; else the policy is put back where that tilt left it.
    Returns the last kept tilt's metrics, each tilt's summary under `grow`."""
    metrics = train_tilt(policy, tokenizer, prompts, reward_fn, settings, config, progress=progress, **kwargs)
    steps = [_step_summary(metrics, kept=True)]
    for step in range(1, config.grow_steps):
        last = metrics["kept"]
        if not last["within_bound"] or last["val_score"] is None:
            break
        state = _trainable(policy)
        progress(f"tilt: step {step + 1} of {config.grow_steps}: the replies of the version kept, tilted again")
        again = train_tilt(policy, tokenizer, prompts, reward_fn, settings,
                           dataclasses.replace(config, seed=config.seed + step), progress=progress, **kwargs)
        # Against the version it started from, sampled afresh on the same
        # prompts: the score the step before kept is the best of its epochs
        # on one sampling, and reads high by the luck of that sampling
        # (by up to 0.45 logits on `concise`).
        kept, start = again["kept"], again["validation"]["start_score"]
        better = bool(kept["within_bound"] and None not in (kept["val_score"], start) and kept["val_score"] > start)
        steps.append(_step_summary(again, kept=better))
        if not better:
            _restore(policy, state)
            progress(f"tilt: step {step + 1} was no better on validation within the bounds (reward-model score "
                     f"{_fmt(kept['val_score'])} against {_fmt(start)} at its start); step {step} is kept")
            break
        metrics = again
    seconds = round(sum(s["seconds"] for s in steps), 1)
    return {**metrics, "grow": steps, "grow_kept": sum(s["kept"] for s in steps), "seconds": seconds}


def _step_summary(metrics: dict, kept: bool) -> dict:
    record = metrics["kept"]
    return {"kept": kept, "epoch_kept": metrics["epoch_kept"], "score_sampled": metrics["score_sampled"],
            "score_target": metrics["score_target"], "val_score": record["val_score"],
            "val_excess_nll": record["val_excess_nll"], "val_kl": record["val_kl"],
            "within_bound": record["within_bound"], "seconds": metrics["seconds"]}


def _trainable(policy) -> dict:
    """A copy of `policy`'s trainable weights (its adapter)."""
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _restore(policy, state: dict) -> None:
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name in state:
                param.copy_(state[name])


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _top_ten_bound(config: TiltConfig, limits: dict) -> str:
    increase = config.max_top_ten_increase
    return "none" if increase is None else f"{limits['base_top_ten'] + increase:.0%}"


def _bound(x) -> str:
    return "none" if x is None else f"{x:g}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _round(x):
    return None if x is None else round(x, 4)
