"""Sampling replies in batches and scoring their tokens: shared by PPO
rollouts, evaluation and the simulated users."""

from __future__ import annotations

import torch

from chatbot.models import forward_arguments
from online_rl.data import encode


def left_pad(rows: list[list[int]], pad_id: int, device):
    """Left-padded ids and attention mask: every prompt ends at the same column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[dict]], settings, *, max_prompt_tokens: int = 256, device=None,
           synced_gpus: bool = False) -> dict:
    """One reply per prompt, sampled with `settings` (a
    `chatbot.models.GenerationSettings`: the same `GenerationConfig` the bot
    serves with; greedy when its temperature is 0).

    Returns the batch: ``prompt_ids``/``prompt_mask`` (left-padded),
    ``reply``/``reply_mask`` (tokens up to and including the first
    end-of-sequence), ``finished`` (an end-of-sequence was produced),
    ``texts`` and ``prompts``.

    `synced_gpus`: keep generating until every process has finished, for a
    model sharded across processes (each forward pass is a collective).
    """
    device = device or next(model.parameters()).device
    rows = [encode(tokenizer, p, max_length=max_prompt_tokens)[0] for p in prompts]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    config, processors = settings.generation_config(tokenizer), []
    if settings.within_base and adapted(model):
        processors.append(WithinBase(model, prompt_mask, settings))
        config.top_p = 1.0  # the version's own nucleus is in `restrict`; a second cut would narrow it again
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                         logits_processor=processors, synced_gpus=synced_gpus)
    model.train(was_training)
    reply = out[:, prompt_ids.shape[1]:]
    is_eos = reply == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    reply_mask = (~after_eos).long()
    reply = torch.where(reply_mask.bool(), reply, torch.full_like(reply, tokenizer.pad_token_id))
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(reply, reply_mask)]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "reply": reply, "reply_mask": reply_mask,
            "finished": is_eos.any(-1), "texts": texts, "prompts": prompts}


def adapted(model) -> bool:
    """Whether `model` writes as an adapter version: a peft model with an
    adapter enabled (not inside `disable_adapter()`)."""
    if not hasattr(model, "peft_config") or not hasattr(model, "disable_adapter"):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules())


class WithinBase:
    """A `generate` logits processor that keeps an adapter version to the
    base's words (`GenerationSettings.restrict`): at each step it reads the
    new tokens with the adapter disabled, in a cache of its own, and masks
    the version's logits outside the base's nucleus. Serving does the same
    with a base row beside each adapted one (`chatbot.engine`).

    Written here because transformers has no processor that runs a second
    model: its assisted and contrastive decoding run one, but to propose or
    re-rank tokens, not to bound the sampler."""

    def __init__(self, model, prompt_mask, settings):
        from transformers import DynamicCache

        self.model, self.settings = model, settings
        self.mask = prompt_mask
        self.cache = DynamicCache()
        self.read = 0  # columns of `input_ids` the base has read
        self.arguments = forward_arguments(model)  # (the cache's keyword, last position only), once

    def __call__(self, input_ids, scores):
        grown = input_ids.shape[1] - self.mask.shape[1]
        if grown > 0:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], grown)], dim=1)
        new = input_ids[:, self.read:]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, self.read:]
        cache, last_only = self.arguments
        with self.model.disable_adapter():
            base = self.model(input_ids=new, attention_mask=self.mask, position_ids=positions, use_cache=True,
                              **{cache: self.cache}, **last_only).logits[:, -1]
        self.read = input_ids.shape[1]
        return self.settings.restrict(scores, base.to(scores.dtype))


def encode_replies(tokenizer, prompts: list[list[dict]], replies: list[str], *, max_length: int = 256,
                   device=None) -> dict:
    """Given replies as a batch in `sample`'s layout (each closed by the
    end-of-sequence token): to score replies the policy did not sample, such
    as liked replies for the language anchor or held-out rated replies."""
    encoded = [encode(tokenizer, p, r, max_length=max_length) for p, r in zip(prompts, replies)]
    prompt_ids, prompt_mask = left_pad([p for p, _ in encoded], tokenizer.pad_token_id, device)
    width = max(len(r) for _, r in encoded)
    reply = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    reply_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (_, r) in enumerate(encoded):
        reply[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        reply_mask[i, :len(r)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "reply": reply.to(device),
            "reply_mask": reply_mask.to(device), "finished": torch.ones(len(encoded), dtype=torch.bool),
            "texts": list(replies), "prompts": prompts}


def sample_many(model, tokenizer, prompts: list[list[dict]], settings, *, batch_size: int = 64,
                **kwargs) -> list[dict]:
    """`sample` over prompts in batches."""
    return [sample(model, tokenizer, prompts[i:i + batch_size], settings, **kwargs)
            for i in range(0, len(prompts), batch_size)]


def full_inputs(batch: dict, index=slice(None)):
    """Prompt and reply joined: ids, mask, position ids, and where the reply starts."""
    ids = torch.cat([batch["prompt_ids"][index], batch["reply"][index]], 1)
    mask = torch.cat([batch["prompt_mask"][index], batch["reply_mask"][index]], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, batch["prompt_ids"].shape[1]


@torch.no_grad()
def reply_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each reply token under `model` (0 on padding), from
    its logits divided by `temperature` (1: the model's own distribution,
    what the base model's NLL per token is measured with)."""
    return token_logprobs(reply_logits(model, batch), batch, temperature)


@torch.no_grad()
def reply_logits(model, batch: dict) -> torch.Tensor:
    """`model`'s logits (float) at each position that predicts a reply token:
    batch x reply length x vocabulary."""
    ids, mask, positions, start = full_inputs(batch)
    # Logits only where they predict a reply token: the prompt's positions
    # would cost batch x prompt x vocabulary for nothing.
    keep = ids.shape[1] - start + 1
    return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                 logits_to_keep=keep).logits[:, -keep:-1].float()


def token_logprobs(logits: torch.Tensor, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each reply token from `reply_logits` divided by
    `temperature` (0 on padding)."""
    logp = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, batch["reply"].unsqueeze(-1)).squeeze(-1) * batch["reply_mask"]


def row_chunks(batch: dict, vocabulary: int, max_numbers: int = 1 << 26):
    """`batch` in pieces of whole rows whose reply logits (rows x reply
    length x `vocabulary`) hold at most `max_numbers` numbers (256 MB of
    float32), or one row: a large vocabulary's logits for a batch of 64
    replies of 96 tokens would take gigabytes."""
    rows, length = batch["reply"].shape
    step = max(1, max_numbers // max(1, length * vocabulary))
    for i in range(0, rows, step):
        yield {k: v[i:i + step] for k, v in batch.items()}
