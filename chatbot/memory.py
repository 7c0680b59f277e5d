"""The memory plan: what serving and one retrain cycle will need, before
anything is loaded, and whether the chosen devices have it.

Estimated from the model's config alone (the model is built on the meta
device to count its parameters and LoRA targets; no weights are read):

- **serving**: base weights (in the serving dtype, or 8/4 bits), three LoRA
  adapters (the active one, the one before it while its last replies finish,
  and the spare the next version is copied into, `chatbot.policy`), the KV cache of a full batch (`--max-batch`
  replies, two rows each: `ROWS_PER_REPLY`) at the longest context served, and a fixed overhead (CUDA context,
  allocator slack). `largest_batch` says how many replies would fit;
- **one retrain** (its own process): the policy's copy of the base, the
  reward model's copy (when it is the same base, a second copy: it is a
  different head), for each the LoRA weights with their gradients and AdamW
  state in float32, the KV cache of a batch of rollouts, activations kept for
  backward over one PPO minibatch (per layer about ``s·b·h·34`` bytes at 16
  bits, after Korthikanti et al. 2022, doubled in float32) and the
  float32 logits of that minibatch. With several training processes each
  samples its share of the rollouts; under FSDP the policy's weights and LoRA
  state are split too, while the main process still trains the reward model
  alone and evaluates the candidate on a whole copy of the base (the plan
  takes the largest of these phases).

Estimates are deliberately simple and on the high side; the plan refuses to
start when the need passes `headroom` (90%) of what the device has free, with
a message that names the numbers and the settings that change them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GIB = 2**30
OVERHEAD = {"cuda": 0.75 * GIB, "cpu": 0.75 * GIB}  # CUDA context and allocator slack; the process itself on a CPU
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.56}  # per quantized weight, with scales


class MemoryPlanError(RuntimeError):
    """The configuration does not fit; the message says by how much and what to change."""


@dataclass
class Shape:
    params: int
    linear_params: int  # weights of the Linear layers bitsandbytes would quantize (not the embeddings)
    lora_params: int  # LoRA r=16 on every projection (PPO's and the reward model's default)
    layers: int
    hidden: int
    kv_width: int  # kv heads x head dim
    vocab: int
    max_context: int


@dataclass
class Plan:
    name: str
    device: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes
    batch: int = 0  # serving: the batch's replies (`ROWS_PER_REPLY` rows each), whose KV cache is parts["KV cache"]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        def label(k: str) -> str:
            return f"{k} of {self.batch} repl{'ies' if self.batch != 1 else 'y'}" if k == "KV cache" and self.batch else k

        parts = ", ".join(f"{label(k)} {v / GIB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GIB)
        return f"{self.total / GIB:.2f} GiB ({parts})"


def model_shape(config, lora_r: int = 16) -> Shape:
    """Parameter counts of a causal LM from its config, built on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one matrix for input and output embeddings, counted once
    params = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            linear += module.weight.numel()
            lora += lora_r * (module.in_features + module.out_features)
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(params=params, linear_params=linear, lora_params=lora, layers=text.num_hidden_layers,
                 hidden=text.hidden_size, kv_width=kv_heads * head_dim, vocab=text.vocab_size,
                 max_context=getattr(text, "max_position_embeddings", 2048) or 2048)


def _weights(shape: Shape, dtype_bytes: int, quantize: str) -> float:
    if quantize in QUANT_BYTES:
        return shape.linear_params * QUANT_BYTES[quantize] + (shape.params - shape.linear_params) * dtype_bytes
    return shape.params * dtype_bytes


def kv_bytes_per_row(shape: Shape, dtype_bytes: int, context_tokens: int = 4096) -> float:
    """The KV cache of one batch row at the longest context served."""
    return 2 * shape.layers * shape.kv_width * dtype_bytes * min(context_tokens, shape.max_context)


# Rows a reply keeps in the batch: its own and, on an adapter version, a
# shadow on the base whose logits keep it within the base's words
# (`chatbot.engine`). The plan counts both for every reply.
ROWS_PER_REPLY = 2


def serving_plan(shape: Shape, device: str, dtype_bytes: int, *, quantize: str = "none",
                 context_tokens: int = 4096, batch: int = 1) -> Plan:
    return Plan("serving", device, {
        "weights": _weights(shape, dtype_bytes, quantize),
        "adapters": 3 * shape.lora_params * 4,
        "KV cache": batch * ROWS_PER_REPLY * kv_bytes_per_row(shape, dtype_bytes, context_tokens),
        "overhead": OVERHEAD["cuda" if device.startswith("cuda") else "cpu"],
    }, batch=batch)


# The batch's rows when --max-batch is not given: as many as fit, at most
# this many (on the CPU more rows add latency sooner than throughput).
AUTO_BATCH = {True: 32, False: 8}  # keyed by "on a GPU"


def with_batch(plan: Plan, rows: int) -> Plan:
    """The serving plan with `rows` batch rows (other plans unchanged)."""
    if plan.name != "serving":
        return plan
    return Plan(plan.name, plan.device, {**plan.parts, "KV cache": _per_row(plan) * rows}, batch=rows)


def _per_row(serving: Plan) -> float:
    return serving.parts["KV cache"] / serving.batch


def serving_batch(plans: list[Plan], requested: int | None, *, headroom: float = 0.9, available=None) -> int:
    """The serving batch's rows: `requested` when it fits beside the rest of
    the plans (else `MemoryPlanError`, naming the rows that would fit); None:
    as many as fit, at most `AUTO_BATCH` for the device."""
    serving = next(p for p in plans if p.name == "serving")
    fits = largest_batch(plans, headroom=headroom, available=available)
    if requested is None:
        return max(1, min(fits, AUTO_BATCH[serving.device.startswith("cuda")]))
    if requested > fits:
        per_row = _per_row(serving)
        raise MemoryPlanError(
            f"--max-batch {requested} does not fit on {serving.device}: each reply's KV cache at the longest "
            f"context (its row and its shadow's on the base) takes {per_row / GIB:.2f} GiB, and {fits} replies fit beside the weights and the rest of the "
            f"plan; use --max-batch {fits}" if fits else
            f"--max-batch {requested} does not fit on {serving.device}: not even one reply's KV cache fits "
            f"({per_row / GIB:.2f} GiB) beside the weights and the rest of the plan")
    return requested


def largest_batch(plans: list[Plan], *, headroom: float = 0.9, available=None) -> int:
    """How many batch rows the serving plan among `plans` could have on its
    device, beside whatever else the plans put there (0: not even one)."""
    available = available or available_bytes
    serving = next(p for p in plans if p.name == "serving")
    others = sum(p.total for p in plans if p.device == serving.device) - serving.parts["KV cache"]
    return max(0, int((headroom * available(serving.device) - others) // _per_row(serving)))


def training_plan(shape: Shape, device: str, dtype_bytes: int, *, quantize: str = "none", rollouts: int = 32,
                  minibatch: int = 8, prompt_tokens: int = 256, new_tokens: int = 32,
                  reward_shape: Shape | None = None, processes: int = 1, sharded: bool = False,
                  eval_batch: int = 64) -> Plan:
    """One retrain on one process's device. With several processes each
    samples its share of the rollouts; `sharded` (FSDP) also splits the
    policy's weights and LoRA state, and the plan is then the largest of the
    main process's three phases: training the reward model, PPO on a shard
    (with the reward model), and evaluating the candidate on a whole copy of
    the base (see online_rl/cycle.py)."""
    seq = prompt_tokens + new_tokens
    reward = reward_shape or shape
    act_bytes = 34 * (dtype_bytes / 2)
    overhead = OVERHEAD["cuda" if device.startswith("cuda") else "cpu"]
    weights, reward_weights = _weights(shape, dtype_bytes, quantize), _weights(reward, dtype_bytes, quantize)
    per_process = max(1, rollouts // max(1, processes))
    shard = processes if sharded else 1
    ppo = {
        "policy weights" if shard == 1 else f"policy weights (1/{shard})": weights / shard,
        "reward model weights": reward_weights,
        "LoRA + AdamW": (shape.lora_params / shard + reward.lora_params) * 16,
        "rollout KV cache": 2 * shape.layers * shape.kv_width * dtype_bytes * seq * per_process,
        "activations": shape.layers * seq * minibatch * shape.hidden * act_bytes,
        "logits": 3 * minibatch * seq * shape.vocab * 4,
        "overhead": overhead,
    }
    if not sharded:
        return Plan("one retrain", device, ppo)
    phases = {
        f"one retrain (PPO sharded over {processes})": ppo,
        "one retrain (training the reward model)": {
            "reward model weights": reward_weights,
            "reward model LoRA + AdamW": reward.lora_params * 16,
            "reward model activations": reward.layers * seq * minibatch * reward.hidden * act_bytes,
            "overhead": overhead,
        },
        "one retrain (evaluating the candidate whole)": {
            "policy weights": weights,
            "reward model weights": reward_weights,
            "evaluation KV cache": 2 * shape.layers * shape.kv_width * dtype_bytes * seq * eval_batch,
            # the reply positions' logits, then their float32 copy and log-softmax
            "evaluation logits": eval_batch * (new_tokens + 1) * shape.vocab * (dtype_bytes + 8),
            "overhead": overhead,
        },
    }
    name, parts = max(phases.items(), key=lambda item: sum(item[1].values()))
    return Plan(name, device, parts)


def available_bytes(device: str) -> float:
    """Free memory on a CUDA device, or available memory of this machine for the CPU."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return float(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check(plans: list[Plan], *, headroom: float = 0.9, available=available_bytes, hints: str = "") -> dict:
    """Refuse (`MemoryPlanError`) when the plans on one device need more than
    `headroom` of what it has free; return the figures otherwise."""
    by_device: dict[str, list[Plan]] = {}
    for plan in plans:
        by_device.setdefault(plan.device, []).append(plan)
    report = {}
    for device, on_it in by_device.items():
        need = sum(p.total for p in on_it)
        have = available(device)
        report[device] = {"need_gib": round(need / GIB, 2), "free_gib": round(have / GIB, 2)}
        if need > headroom * have:
            what = "; ".join(f"{p.name} needs {p.describe()}" for p in on_it)
            raise MemoryPlanError(
                f"not enough memory on {device}: {what}; together {need / GIB:.2f} GiB, but {device} has "
                f"{have / GIB:.2f} GiB free (the plan keeps {100 - headroom * 100:.0f}% spare). {hints}".strip())
    return report


def device_key(device) -> str:
    """One name per physical device: "cuda" and "cuda:0" are the same GPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def plan(model_path: str, *, serve_device=None, train_device=None, quantize: str = "none",
         reward_model_path: str | None = None, ppo=None, new_tokens: int = 96, context_tokens: int = 4096,
         processes: int = 1, sharded: bool = False, batch: int = 1) -> list[Plan]:
    """The plans for serving on `serve_device` and/or one retrain on
    `train_device` (None: not planned), from the models' configs. A retrain
    of several `processes` is planned for one of them (`train_device` is
    that process's device); `sharded`: under FSDP; `new_tokens`: the reply
    cap, which rollouts sample to as the bot serves; `batch`: the serving
    batch's rows."""
    from transformers import AutoConfig

    def shape_of(path):
        return model_shape(AutoConfig.from_pretrained(path), lora_r=getattr(ppo, "lora_r", 16))

    shape = shape_of(model_path)
    plans = []
    for role, device in (("serve", serve_device), ("train", train_device)):
        if device is None:
            continue
        key = device_key(device)
        dtype_bytes = 4 if key == "cpu" else 2
        if role == "serve":
            plans.append(serving_plan(shape, key, dtype_bytes, quantize=quantize, context_tokens=context_tokens,
                                      batch=batch))
        else:
            reward = shape_of(reward_model_path) if reward_model_path and reward_model_path != model_path else None
            extra = {} if ppo is None else dict(rollouts=ppo.rollouts, minibatch=ppo.minibatch,
                                                prompt_tokens=ppo.max_prompt_tokens, new_tokens=new_tokens)
            plans.append(training_plan(shape, key, dtype_bytes, quantize=quantize, reward_shape=reward,
                                       processes=processes, sharded=sharded, **extra))
    return plans


HINTS = ("To fit: --quantize 4bit (or 8bit) on a GPU, --train-device on another GPU, several training "
         "processes (--train-launcher accelerate; FSDP shards the policy), a smaller --model, "
         "--reward-model with a smaller base, or fewer PPO rollouts; --memory-budget-gib sets what the plan "
         "may use, --no-memory-check skips it.")


def budget(gib: float | None):
    """`available` for `check`: the free memory, or a fixed budget per device."""
    return available_bytes if gib is None else (lambda device: gib * GIB)
