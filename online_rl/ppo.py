"""PPO on a LoRA adapter of a causal LM, readable top to bottom.

One PPO step:

1. **Rollouts.** Sample a reply to each of `rollouts` prompts from the current
   policy (base + adapter), at temperature `temperature`.
2. **Scores.** The reward function scores each finished reply (the reward
   model in a retrain cycle, any callable in tests). A reply cut off at
   `max_new_tokens` without an end-of-sequence token loses
   `missing_eos_penalty`, so rambling on cannot win reward.
3. **Per-token rewards.** ``-kl_coef * (log pi(t) - log ref(t))`` on every reply
   token, plus the score on the last one. The reference is the same base with
   the adapter disabled (`peft`'s ``disable_adapter()``): no second copy.
4. **Advantages.** A value head on the policy's last hidden state estimates the
   return; generalised advantage estimation (GAE) turns rewards and values
   into advantages, which are whitened.
5. **Updates.** `epochs` passes over shuffled minibatches: the clipped
   policy-ratio loss plus the clipped value loss.
6. **KL control.** The KL coefficient follows the adaptive controller of
   Ziegler et al. (2019): it grows when the measured KL to the reference is
   above `target_kl` and shrinks when below.

Everything runs through `accelerate.Accelerator`, so the same code runs on a
CPU, one GPU or several under ``accelerate launch`` (each process samples its
own share of the rollouts; statistics are averaged across processes): DDP by
default, or FSDP (version 2) from an accelerate config file, which shards the
policy's weights, gradients and optimizer state across the processes. Under
FSDP every forward pass is a collective, so rollouts are generated through
the sharded root module with ``synced_gpus`` (all processes keep stepping
until the longest reply is done), and `gather_adapter` collects the trained
LoRA weights whole. Only the LoRA weights and the value head are trained.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from online_rl.sampling import full_inputs, sample

RewardFn = Callable[[list[list[dict]], list[str]], list[float]]
ProgressFn = Callable[[str], None]


@dataclass
class PPOConfig:
    steps: int = 30  # PPO steps (rollouts, then updates)
    rollouts: int = 32  # prompts sampled per step (over all processes)
    minibatch: int = 8
    epochs: int = 4  # passes over each step's rollouts
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0  # rollouts sample at this temperature; log-probs use the same
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    init_kl_coef: float = 0.1
    adaptive_kl: bool = True
    target_kl: float = 3.0  # nats per reply
    kl_horizon: int = 500
    missing_eos_penalty: float = 1.0
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 256
    seed: int = 0


class PolicyWithValue(nn.Module):
    """The LoRA policy and a scalar value head on its last hidden state."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        base = policy.get_base_model()
        # What FSDP wraps as one unit each (accelerate reads it from the root).
        self._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])
        hidden = base.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None, *, generate: dict | None = None):
        """Logits and values; or, with `generate`, the policy's `generate(**generate)`.

        Generation enters through this module's forward so that FSDP's hooks on
        the root gather its parameters (FSDP also requires the root's forward to
        come first)."""
        if generate is not None:
            return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, **generate)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
        # A copy, not a view: FSDP's hooks on a module's outputs do not follow views.
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1).clone()
        return out.logits.float(), values


class _GenerateThroughRoot:
    """What `sample` needs of a model, for a sharded `PolicyWithValue`: every
    `generate` call goes through the root module's forward."""

    def __init__(self, root):
        self.root = root

    @property
    def training(self) -> bool:
        return self.root.training

    def eval(self):
        self.root.eval()

    def train(self, mode: bool = True):
        self.root.train(mode)

    def generate(self, input_ids, attention_mask, **kwargs):
        return self.root(input_ids, attention_mask, generate=kwargs)


def training_engine(environ=None) -> str:
    """The engine `accelerate launch` set up for this process: "fsdp2" or
    "ddp" (also for one process). Raises ValueError for the engines retrains
    do not run on: DeepSpeed, FSDP version 1 (the rollouts and the gathering
    of the adapter are written for FSDP2's per-parameter sharding, and only
    that is tested), and FSDP with its parameters offloaded to the CPU (the
    shards would sit where a GPU collective cannot gather them)."""
    import os

    environ = os.environ if environ is None else environ

    def flag(name):
        return environ.get(name, "false").lower() in ("1", "true", "yes")

    if flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("retrains do not run under DeepSpeed: use an accelerate config with "
                         "distributed_type: FSDP and fsdp_version: 2 (docs/deploy.md), or plain DDP")
    if flag("ACCELERATE_USE_FSDP"):
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"retrains under FSDP need fsdp_version: 2 in the accelerate config "
                             f"(this one asks for version {version})")
        if flag("FSDP_OFFLOAD_PARAMS"):
            raise ValueError("retrains under FSDP do not offload parameters to the CPU: set "
                             "fsdp_offload_params: false in the accelerate config")
        return "fsdp2"
    return "ddp"


def training_accelerator():
    """accelerate's `Accelerator` for a retrain, from the launcher's settings
    (`training_engine`).

    An FSDP config is honoured on CPU processes too: accelerate enables FSDP
    only on accelerators and would fall back to DDP, while torch's FSDP2 runs
    over gloo as well (this is how the sharded path is tested on a machine
    without GPUs).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    engine = training_engine()
    accelerator = Accelerator()
    state = accelerator.state
    if engine == "fsdp2" and state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
        # As accelerate does on GPUs: every later state object reads it from here.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


class AdaptiveKL:
    """Ziegler et al. (2019): coef *= 1 + clip(kl / target - 1, ±0.2) * n / horizon."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive or not math.isfinite(kl):
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


def add_lora(model, config: PPOConfig):
    """A fresh trainable LoRA on every linear layer of the base."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns over the reply tokens (positions where mask is 1)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    return advantages * mask, returns * mask


def token_logprobs(logits, tokens, temperature: float):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logp


class PPOTrainer:
    """PPO for a `PeftModel` causal LM. `train(prompts, reward_fn)` runs `config.steps` steps."""

    def __init__(self, policy, tokenizer, config: PPOConfig, *, accelerator=None, progress: ProgressFn = print,
                 on_step: Callable[[dict], None] | None = None):
        from accelerate.utils import DistributedType

        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = accelerator or training_accelerator()
        self.progress = progress if self.accelerator.is_main_process else (lambda line: None)
        self.on_step = on_step
        torch.manual_seed(config.seed)
        model = PolicyWithValue(policy)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded:
            # accelerate keeps the root unit (here the embeddings, the final
            # norm, lm_head, the value head) whole between forward and
            # backward; a rollout is a long run of forwards, so reshard it too.
            self.model.set_reshard_after_forward(True)
        self.kl = AdaptiveKL(config.init_kl_coef, config.target_kl, config.kl_horizon, config.adaptive_kl)
        self.history: list[dict] = []

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self):
        return self.accelerator.device

    # -- rollouts and forward passes -----------------------------------------

    def rollout(self, prompts: list[list[dict]]) -> dict:
        cfg = self.config
        model = _GenerateThroughRoot(self.model) if self.sharded else self.unwrapped.policy
        return sample(model, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_p=1.0, max_prompt_tokens=cfg.max_prompt_tokens,
                      device=self.device, synced_gpus=self.sharded)

    def _forward(self, model, batch, index=slice(None)):
        """Log-probs of the reply tokens, the full log-softmax, and values."""
        ids, mask, positions, start = full_inputs(batch, index)
        logits, values = model(ids, mask, positions)
        logits, values = logits[:, start - 1:-1], values[:, start - 1:-1]
        logprobs, all_logp = token_logprobs(logits, batch["reply"][index], self.config.temperature)
        return logprobs, all_logp, values

    # -- one step --------------------------------------------------------------

    def step(self, prompts: list[list[dict]], reward_fn: RewardFn) -> dict:
        cfg = self.config
        started = time.perf_counter()
        batch = self.rollout(prompts)
        mask = batch["reply_mask"].float()

        scores = torch.tensor(reward_fn(batch["prompts"], batch["texts"]), dtype=torch.float32,
                              device=self.device)
        raw_scores = scores.clone()
        scores = scores - cfg.missing_eos_penalty * (~batch["finished"]).float()

        self.model.eval()
        with torch.no_grad():
            old_logprobs, _, old_values = self._forward(self.model, batch)
            with self.unwrapped.policy.disable_adapter():
                ref_logprobs, _, _ = self._forward(self.model, batch)
        kl_tokens = (old_logprobs - ref_logprobs) * mask
        rewards = -self.kl.value * kl_tokens
        last = (mask.sum(-1) - 1).long().clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        # Several epochs of shuffled minibatches.
        self.model.train()
        stats = {"pg_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [], "entropy": []}
        n = len(prompts)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, device=self.device)
            for i in range(0, n, cfg.minibatch):
                idx = order[i:i + cfg.minibatch]
                m = mask[idx]
                logprobs, all_logp, values = self._forward(self.model, batch, idx)
                ratio = torch.exp(logprobs - old_logprobs[idx])
                adv = advantages[idx]
                pg1 = -adv * ratio
                pg2 = -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
                pg_loss = masked_mean(torch.maximum(pg1, pg2), m)
                old_v = old_values[idx]
                v_clipped = old_v + (values - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                ret = returns[idx]
                value_loss = 0.5 * masked_mean(torch.maximum((values - ret) ** 2, (v_clipped - ret) ** 2), m)
                loss = pg_loss + cfg.vf_coef * value_loss
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                if cfg.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    entropy = -(all_logp.exp() * all_logp).sum(-1)
                    stats["pg_loss"].append(pg_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["clipfrac"].append(masked_mean((pg2 > pg1).float(), m).item())
                    stats["approx_kl"].append(0.5 * masked_mean((logprobs - old_logprobs[idx]) ** 2, m).item())
                    stats["entropy"].append(masked_mean(entropy, m).item())

        kl_per_reply = kl_tokens.sum(-1)
        local = torch.tensor([
            raw_scores.mean().item(), scores.mean().item(), kl_per_reply.mean().item(),
            mask.sum(-1).mean().item(), batch["finished"].float().mean().item(),
            *[sum(v) / max(1, len(v)) for v in stats.values()],
        ], device=self.device)
        summed = self.accelerator.reduce(local, reduction="mean")
        keys = ["reward", "score", "kl", "reply_tokens", "eos_fraction", *stats.keys()]
        record = {k: round(float(v), 5) for k, v in zip(keys, summed.tolist())}
        record["kl_coef"] = round(self.kl.value, 5)
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.kl.update(record["kl"], n * self.accelerator.num_processes)
        return record

    def train(self, prompts: list[list[dict]], reward_fn: RewardFn) -> list[dict]:
        """Run `config.steps` steps on rollouts drawn from `prompts`."""
        cfg = self.config
        if not prompts:
            raise ValueError("PPO needs at least one prompt to sample rollouts from")
        acc = self.accelerator
        per_process = max(1, cfg.rollouts // acc.num_processes)
        rng = random.Random(cfg.seed * 1000 + acc.process_index)
        for step in range(1, cfg.steps + 1):
            chosen = [prompts[rng.randrange(len(prompts))] for _ in range(per_process)]
            record = {"step": step, **self.step(chosen, reward_fn)}
            self.history.append(record)
            if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
                raise FloatingPointError(f"PPO step {step} produced a non-finite statistic: {record}")
            self.progress(
                f"ppo: step {step}/{cfg.steps} reward {record['reward']:+.3f} kl {record['kl']:.2f} "
                f"(coef {record['kl_coef']:.3f}) entropy {record['entropy']:.2f} clipfrac {record['clipfrac']:.2f} "
                f"approx_kl {record['approx_kl']:.4f} value_loss {record['value_loss']:.3f} ({record['seconds']:.1f} s)"
            )
            if self.on_step:
                self.on_step(record)
        return self.history

    def gather_adapter(self) -> dict:
        """The policy's trained LoRA weights, whole, on the CPU, keyed as in
        the policy's own state dict (what `save_pretrained(state_dict=...)`
        takes). Under FSDP each is gathered from its shards: every process
        must call this."""
        prefix = "policy."
        weights = {}
        for name, param in self.unwrapped.named_parameters():
            if not (param.requires_grad and name.startswith(prefix)):
                continue  # frozen base weights, or the value head
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            weights[name[len(prefix):]] = full.detach().to("cpu", copy=True)
        return weights
