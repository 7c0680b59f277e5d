"""PPO on a LoRA adapter of a causal LM, readable top to bottom.

One step:

1. **Rollouts.** `prompts_per_step` prompts, each answered
   `samples_per_prompt` times by the current policy (base + adapter),
   sampled exactly as the bot serves (`chatbot.models.GenerationSettings`:
   the same temperature, top-p and reply cap, through the same
   `GenerationConfig`).
2. **Rewards.** The reward function scores each reply: in a retrain cycle,
   the reward model's logit (its log-odds of a thumbs-up), never squashed
   into [0, 1], so that the users' taste is not drowned by the KL term.
   Scores are standardized over the step's rollouts, and each reply loses
   `language_coef` times its excess NLL per token (`online_rl.language`:
   the base's NLL of its tokens less what the base's own choices cost at
   the same positions): a babbled reply scores below a real one the taste
   likes as much, and neither a short nor a long reply is charged for where
   its tokens are.
3. **Advantages, critic-free** (RLOO, Ahmadian et al. 2024): each reply's
   reward minus the mean reward of the other replies to the same prompt,
   divided by the batch's standard deviation; below-average replies count
   `negative_weight` times. No value head to warm up, nothing that starts
   random each cycle, and the reward model's scale drops out.
4. **Updates.** Up to `epochs` passes over shuffled minibatches of the
   clipped policy-ratio loss (token-level mean), plus
   - the **KL to the base**, over the whole vocabulary at every reply
     position (not estimated from the sampled token), in the loss as GRPO
     does rather than in the reward: a KL summed into a reply's reward
     charges every extra token, which by itself pushes replies shorter
     whatever the users like. Its coefficient is adapted towards
     `target_kl` nats per token and carried from cycle to cycle in the
     adapter's description;
   - the **language anchor**: KL(base || policy) along the base's own
     replies to prompts of the pool (InstructGPT's "pretraining mix", as
     distillation), which holds the language on prompts the rollouts do not
     visit; and, off by default, a supervised term on liked replies.
   A step's updates stop early (before the minibatch that would go further)
   when the approximate KL between the policy and the one that sampled the
   rollouts passes `max_approx_kl`; the learning rate warms up, then decays
   linearly to a tenth.
5. **Hard stop.** When the KL to the base measured on a step's rollouts
   passes `max_kl` nats per token, the cycle stops there.

Logged every step: the raw reward-model score of the rollouts (it should
rise within a cycle), their base NLL per token, KL to the base per token and
per reply, reply length, the share of replies that ended, the policy, KL and
anchor losses, clip fraction, approximate KL, entropy, KL coefficient, learning rate and
how many minibatch updates ran before the early stop.

The reference policy is the base with the adapter disabled (`peft`'s
``disable_adapter()``): no second copy. Everything runs through
`accelerate` (`online_rl.distributed`): one CPU, one GPU, or several
processes under ``accelerate launch`` (each samples its share of the
prompts; statistics are averaged across processes).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from online_rl.distributed import GenerateThroughRoot, gather_adapter, prepare, training_accelerator
from online_rl.influence import weighted_draw
from online_rl.language import drawn_excess
from online_rl.sampling import encode_replies, full_inputs, sample

RewardFn = Callable[[list[list[dict]], list[str]], list[float]]
ProgressFn = Callable[[str], None]


@dataclass
class PPOConfig:
    steps: int = 30  # PPO steps per cycle (fewer when the KL to the base passes max_kl)
    # Distinct prompts per step (over all processes), and replies to each:
    # each reply's baseline is the mean of the others. Many replies per
    # prompt, because a small model at the serving temperature often writes
    # the same reply every time, and a group of identical replies teaches
    # nothing (with 4 per prompt, 75-94% of the groups had no spread at all).
    prompts_per_step: int = 4
    samples_per_prompt: int = 16
    minibatch: int = 16  # rollouts per gradient step
    epochs: int = 2  # passes over a step's rollouts, unless approx-KL stops them first
    lr: float = 2e-3  # peak learning rate of the LoRA weights
    warmup_steps: int = 3  # linear warm-up, then linear decay to lr / 10 at the last step
    lora_r: int = 16
    lora_alpha: int = 32
    cliprange: float = 0.2
    # Weight of below-average replies' advantages. Pushing a reply's tokens
    # down on a peaked distribution hands their probability to whatever else
    # the vocabulary holds, which is how a small model turns to babble;
    # pushing the better replies up takes mass only from the model's other
    # replies.
    negative_weight: float = 1.0
    # Weight of language in the reward: each reply's score (the reward
    # model's logits, standardized over the step's rollouts) loses this many
    # times the reply's excess NLL per token. Made-up words are improbable
    # to the base, so a babbled reply scores below a real one the taste likes
    # as much; against the base's own choices at the same positions, so
    # length is not charged.
    language_coef: float = 1.0
    kl_coef: float = 0.05  # initial coefficient of the KL to the base (per token); a cycle continues the last one's
    # nats per reply token the adaptive coefficient steers towards. Choosing
    # one of the base's own replies over the others costs KL at the tokens
    # where it chooses, without making the reply any less the base's
    # language; the gate judges language by the base's NLL of the replies.
    target_kl: float = 0.05
    adaptive_kl: bool = True
    max_kl: float = 0.15  # nats per reply token: the cycle stops when its rollouts pass it
    max_approx_kl: float = 0.03  # nats per token between the policy and its sampler: stop the step's updates
    # Weight of a supervised term on replies people liked (NLL per token).
    # Off by default: on the starter it memorizes the few liked replies and
    # raises the base's NLL of everything else (measured: 0.15 -> 0.41 nats
    # per token at weight 1); the base anchor below keeps language instead.
    anchor_coef: float = 0.0
    anchor_batch: int = 8  # liked replies (and corrections) per minibatch
    # Weight of a supervised term on corrections: replies people wrote in
    # place of the bot's (NLL per token). Unlike a liked reply, a correction
    # is the reply a person asked for in so many words: a target to imitate,
    # but a few dozen of them are memorized at a weight near the policy
    # loss's. Measured on the starter (one cycle on 500 thumbs of the `long`
    # taste with 55 corrections, benchmarks/bench_corrections.py's data): at
    # 1.0 KL 0.22 nats per token and the base's NLL of the replies 0.59
    # against its own 0.44 (babble; the gate rejects it); at 0.1 KL 0.06,
    # NLL 0.45, known words 0.94, win rate 0.53 under its reward model; at 0
    # win rate 0.48.
    correction_coef: float = 0.1
    # Weight of the base's own replies as the language anchor (InstructGPT's
    # "pretraining mix", as distillation): KL(base || policy) over the whole
    # vocabulary along replies the base sampled, at the serving settings, to
    # prompts of the pool. It holds the policy's language on the prompts a
    # step's rollouts do not visit (measured on the starter, 30 steps at lr
    # 2e-3: base NLL per token of held-out replies 0.15 -> 0.34 without it,
    # 0.16-0.19 with it).
    base_anchor_coef: float = 2.0
    base_anchor_prompts: int = 256  # prompts the base answers once at the start of a cycle
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 256
    seed: int = 0

    @property
    def rollouts(self) -> int:
        """Replies sampled per step."""
        return self.prompts_per_step * self.samples_per_prompt

    def validate(self) -> "PPOConfig":
        if self.steps < 1 or self.prompts_per_step < 1 or self.minibatch < 1 or self.epochs < 1:
            raise ValueError("PPO steps, prompts per step, minibatch and epochs must be at least 1")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2: each reply's baseline is the other replies")
        if not (self.target_kl > 0 and self.max_kl > 0 and self.max_approx_kl > 0):
            raise ValueError("target_kl, max_kl and max_approx_kl must be positive")
        if self.kl_coef < 0 or self.anchor_coef < 0:
            raise ValueError("kl_coef and anchor_coef cannot be negative")
        return self


class AdaptiveKL:
    """Ziegler et al. (2019): coef *= 1 + clip(kl / target - 1, ±0.2) * n / horizon.

    With a horizon of two steps' rollouts the coefficient moves by up to 10%
    a step; its value is carried from one cycle to the next."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive or not math.isfinite(kl):
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value = max(1e-4, self.value * (1 + error * n / self.horizon))


def add_lora(model, config):
    """A fresh trainable LoRA on every linear layer of the base, of the rank
    and alpha of `config` (a `PPOConfig`, or any with `lora_r` and `lora_alpha`)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def leave_one_out(scores: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO advantages: each score minus the mean of the other scores of its
    group (consecutive runs of `group` replies to one prompt)."""
    s = scores.view(-1, group)
    baseline = (s.sum(1, keepdim=True) - s) / (group - 1)
    return (s - baseline).reshape(-1)


def token_logprobs(logits, tokens, temperature: float):
    logp = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logp


class PPOTrainer:
    """PPO for a `PeftModel` causal LM.

    `train(prompts, reward_fn, anchor)` runs up to `config.steps` steps;
    `settings` is the `GenerationSettings` the bot serves with; `anchor` is a
    list of (prompt, liked reply) for the language anchor."""

    def __init__(self, policy, tokenizer, config: PPOConfig, settings, *, accelerator=None,
                 progress: ProgressFn = print, on_step: Callable[[dict], None] | None = None):
        self.config = config.validate()
        self.settings = settings.validate()
        self.tokenizer = tokenizer
        self.accelerator = accelerator or training_accelerator()
        self.progress = progress if self.accelerator.is_main_process else (lambda line: None)
        self.on_step = on_step
        torch.manual_seed(config.seed)

        def optimizer_for(params):
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

        self.model, self.optimizer, self.sharded = prepare(self.accelerator, policy, optimizer_for)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.kl = AdaptiveKL(config.kl_coef, config.target_kl, 2 * config.rollouts, config.adaptive_kl)
        self.history: list[dict] = []
        self.stopped: str | None = None
        self.base_replies: list[tuple[list[dict], str]] = []
        self.anchor_weights: list[float] | None = None  # of the liked replies, as `train` was given them
        self.corrections: list[tuple[list[dict], str]] = []  # (prompt, correction): supervised targets
        self.correction_weights: list[float] | None = None

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then linear decay to a tenth."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 1.0 - 0.9 * min(1.0, (step - cfg.warmup_steps) / span)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self):
        return self.accelerator.device

    # -- rollouts and forward passes -----------------------------------------

    def rollout(self, prompts: list[list[dict]]) -> dict:
        model = GenerateThroughRoot(self.model) if self.sharded else self.unwrapped.policy
        return sample(model, self.tokenizer, prompts, self.settings, max_prompt_tokens=self.config.max_prompt_tokens,
                      device=self.device, synced_gpus=self.sharded)

    def _reply_logits(self, batch, index=slice(None)):
        """The logits that predict each reply token."""
        ids, mask, positions, start = full_inputs(batch, index)
        keep = ids.shape[1] - start + 1
        return self.model(ids, mask, positions, logits_to_keep=keep)[:, -keep:-1]

    def _logprobs(self, batch, index=slice(None), temperature: float | None = None):
        """Log-probs of the reply tokens and the full log-softmax, at the
        serving temperature (top-p is left out: a token the sampler's nucleus
        held can fall outside the updated policy's, and its ratio would be
        infinite; TRL and OpenRLHF make the same choice)."""
        t = self.settings.logprob_temperature if temperature is None else temperature
        return token_logprobs(self._reply_logits(batch, index), batch["reply"][index], t)

    # -- one step --------------------------------------------------------------

    def step(self, prompts: list[list[dict]], reward_fn: RewardFn, anchor: list[tuple[list[dict], str]],
             rng: random.Random) -> dict:
        cfg = self.config
        started = time.perf_counter()
        k = cfg.samples_per_prompt
        batch = self.rollout([p for p in prompts for _ in range(k)])
        mask = batch["reply_mask"].float()
        scores = torch.tensor(reward_fn(batch["prompts"], batch["texts"]), dtype=torch.float32,
                              device=self.device)

        self.model.eval()
        with torch.no_grad():
            old_logprobs, _ = self._logprobs(batch)
            with self.unwrapped.policy.disable_adapter():
                base_logits = self._reply_logits(batch)  # one forward, two temperatures
            ref_logprobs, _ = token_logprobs(base_logits, batch["reply"], self.settings.logprob_temperature)
            base_logprobs, _ = token_logprobs(base_logits, batch["reply"], 1.0)
        kl_tokens = (old_logprobs - ref_logprobs) * mask
        base_nll = -(base_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        excess = drawn_excess(base_logits, batch["reply"], mask, self.settings)
        rewards = (scores - scores.mean()) / (scores.std() + 1e-6) - cfg.language_coef * excess
        advantages = leave_one_out(rewards, k)
        advantages = advantages / (advantages.std() + 1e-6)
        advantages = torch.where(advantages < 0, cfg.negative_weight * advantages, advantages)

        self.model.train()
        stats = {"pg_loss": [], "kl_loss": [], "anchor_loss": [], "base_anchor_loss": [], "correction_loss": [],
                 "clipfrac": [], "approx_kl": [], "entropy": []}
        n, updates, early = len(batch["texts"]), 0, False
        for _ in range(cfg.epochs):
            order = torch.randperm(n, device=self.device)
            for i in range(0, n, cfg.minibatch):
                idx = order[i:i + cfg.minibatch]
                m = mask[idx]
                logprobs, all_logp = self._logprobs(batch, idx)
                log_ratio = logprobs - old_logprobs[idx]
                with torch.no_grad():
                    approx_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, m).item()
                if updates and approx_kl > cfg.max_approx_kl:
                    early = True  # the policy has left the region its rollouts can vouch for
                    break
                ratio = torch.exp(log_ratio)
                adv = advantages[idx].unsqueeze(-1)
                pg1 = -adv * ratio
                pg2 = -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
                pg_loss = masked_mean(torch.maximum(pg1, pg2), m)
                with torch.no_grad(), self.unwrapped.policy.disable_adapter():
                    _, ref_all = self._logprobs(batch, idx)
                # The whole distribution's KL at every reply position, not an
                # estimate from the sampled token: it holds the tokens the
                # rollouts did not pick as well, which is where drift into
                # made-up words starts.
                kl_loss = masked_mean((all_logp.exp() * (all_logp - ref_all)).sum(-1), m)
                loss = pg_loss + self.kl.value * kl_loss
                anchor_loss = self._anchor_loss(anchor, rng, cfg.anchor_coef)
                if anchor_loss is not None:
                    loss = loss + cfg.anchor_coef * anchor_loss
                target_loss = self._anchor_loss(self.corrections, rng, cfg.correction_coef, self.correction_weights)
                if target_loss is not None:
                    loss = loss + cfg.correction_coef * target_loss
                base_loss = self._distill_loss(self.base_replies, rng, cfg.base_anchor_coef)
                if base_loss is not None:
                    loss = loss + cfg.base_anchor_coef * base_loss
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                if cfg.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                updates += 1
                with torch.no_grad():
                    entropy = -(all_logp.exp() * all_logp).sum(-1)
                    stats["pg_loss"].append(pg_loss.item())
                    stats["kl_loss"].append(kl_loss.item())
                    stats["anchor_loss"].append(anchor_loss.item() if anchor_loss is not None else 0.0)
                    stats["base_anchor_loss"].append(base_loss.item() if base_loss is not None else 0.0)
                    stats["correction_loss"].append(target_loss.item() if target_loss is not None else 0.0)
                    stats["clipfrac"].append(masked_mean((pg2 > pg1).float(), m).item())
                    stats["approx_kl"].append(approx_kl)
                    stats["entropy"].append(masked_mean(entropy, m).item())
            if early:
                break
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()

        tokens = mask.sum(-1)
        local = torch.tensor([
            scores.mean().item(), base_nll.mean().item(), (kl_tokens.sum() / mask.sum().clamp(min=1)).item(),
            kl_tokens.sum(-1).mean().item(), tokens.mean().item(), batch["finished"].float().mean().item(),
            *[sum(v) / max(1, len(v)) for v in stats.values()],
        ], device=self.device)
        summed = self.accelerator.reduce(local, reduction="mean")
        keys = ["score", "base_nll", "kl_per_token", "kl", "reply_tokens", "eos_fraction", *stats.keys()]
        record = {key: round(float(v), 5) for key, v in zip(keys, summed.tolist())}
        record.update(kl_coef=round(self.kl.value, 5), lr=round(lr, 7), updates=updates, early_stop=early,
                      seconds=round(time.perf_counter() - started, 2))
        self.kl.update(record["kl_per_token"], cfg.rollouts)
        return record

    def _anchor_batch(self, pairs, rng: random.Random, weights: list[float] | None = None) -> dict:
        """A few of the (prompt, reply) `pairs`, drawn at random (in
        proportion to `weights` when given), as a batch."""
        chosen = weighted_draw(pairs, weights, self.config.anchor_batch, rng) if weights else \
            [pairs[rng.randrange(len(pairs))] for _ in range(self.config.anchor_batch)]
        return encode_replies(self.tokenizer, [p for p, _ in chosen], [r for _, r in chosen],
                              max_length=self.config.max_prompt_tokens, device=self.device)

    def _anchor_loss(self, anchor, rng: random.Random, weight: float, weights: list[float] | None = None):
        """NLL per token (temperature 1) of a few of the (prompt, reply)
        pairs in `anchor` (liked replies, drawn by `anchor_weights`, or the
        `weights` given); None without any, or at weight 0."""
        if not anchor or not weight:
            return None
        batch = self._anchor_batch(anchor, rng, weights if weights is not None else self.anchor_weights)
        logprobs, _ = self._logprobs(batch, temperature=1.0)
        return -masked_mean(logprobs, batch["reply_mask"].float())

    def _distill_loss(self, pairs, rng: random.Random, weight: float):
        """KL(base || policy) over the whole vocabulary along a few of the
        base's own replies: the base's full next-token distributions as soft
        targets, so the policy keeps the base's language where it is not
        being taught anything, without memorizing the sampled tokens."""
        if not pairs or not weight:
            return None
        batch = self._anchor_batch(pairs, rng)
        _, student = self._logprobs(batch, temperature=1.0)
        with torch.no_grad(), self.unwrapped.policy.disable_adapter():
            _, teacher = self._logprobs(batch, temperature=1.0)
        return masked_mean((teacher.exp() * (teacher - student)).sum(-1), batch["reply_mask"].float())

    def _base_samples(self, prompts: list[list[dict]]) -> list[tuple[list[dict], str]]:
        """The base's own replies (adapter disabled) to `prompts`, finished
        ones only, sampled as the bot serves."""
        out = []
        with self.unwrapped.policy.disable_adapter():
            for i in range(0, len(prompts), 64):
                batch = self.rollout(prompts[i:i + 64])
                out.extend((p, t) for p, t, done in zip(batch["prompts"], batch["texts"], batch["finished"].tolist())
                           if done and t)
        return out

    def train(self, prompts: list[list[dict]], reward_fn: RewardFn,
              anchor: list[tuple[list[dict], str]] | None = None, *,
              prompt_weights: list[float] | None = None, anchor_weights: list[float] | None = None,
              corrections: list[tuple[list[dict], str]] | None = None,
              correction_weights: list[float] | None = None) -> list[dict]:
        """Run up to `config.steps` steps on rollouts drawn from `prompts`.

        With `prompt_weights` (and `anchor_weights`, `correction_weights`),
        prompts (and liked replies, corrections) are drawn in proportion to
        them (`influence.weighted_draw`), so each rater's share of the draws
        is their share of the weight. `corrections` (prompt, the reply a
        person wrote instead) are supervised targets (`correction_coef`)."""
        cfg = self.config
        if not prompts:
            raise ValueError("PPO needs at least one prompt to sample rollouts from")
        acc = self.accelerator
        per_process = max(1, cfg.prompts_per_step // acc.num_processes)
        rng = random.Random(cfg.seed * 1000 + acc.process_index)
        self.anchor_weights = anchor_weights
        self.corrections, self.correction_weights = list(corrections or []), correction_weights

        def draw(k: int) -> list[list[dict]]:
            if prompt_weights:
                return weighted_draw(prompts, prompt_weights, k, rng)
            return rng.sample(prompts, k) if len(prompts) >= k else [prompts[rng.randrange(len(prompts))]
                                                                     for _ in range(k)]

        if cfg.base_anchor_coef and not self.base_replies:
            self.base_replies = self._base_samples(draw(min(len(prompts), cfg.base_anchor_prompts)))
        for step in range(1, cfg.steps + 1):
            chosen = draw(per_process)
            record = {"step": step, **self.step(chosen, reward_fn, anchor or [], rng)}
            self.history.append(record)
            if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
                raise FloatingPointError(f"PPO step {step} produced a non-finite statistic: {record}")
            self.progress(
                f"ppo: step {step}/{cfg.steps} score {record['score']:+.3f} kl/token {record['kl_per_token']:.3f} "
                f"(coef {record['kl_coef']:.3f}) base NLL {record['base_nll']:.3f} tokens {record['reply_tokens']:.1f} "
                f"anchor {record['anchor_loss']:.2f}/{record['base_anchor_loss']:.3f} approx_kl {record['approx_kl']:.4f} updates {record['updates']} "
                f"({record['seconds']:.1f} s)"
            )
            if self.on_step:
                self.on_step(record)
            if record["kl_per_token"] > cfg.max_kl:
                self.stopped = (f"KL to the base {record['kl_per_token']:.3f} nats per token passed the cap "
                                f"of {cfg.max_kl:g} at step {step}")
                self.progress(f"ppo: stopped: {self.stopped}")
                break
        return self.history

    def gather_adapter(self) -> dict:
        """The trained LoRA weights, whole, on the CPU (every process must call it under FSDP)."""
        return gather_adapter(self.unwrapped)
