"""The offline starter model: a tiny Llama-style chatbot built from the
English conversations of the `chatterbot-corpus` package.

Built once, on the CPU, in a few minutes, and cached under
``<data-dir>/models/starter``. The build writes into a scratch directory and
renames it into place only when it is complete, under a file lock, so an
interrupted build is never used and two processes never build at once.

Small and many steps beats large and few on a 2-core CPU: a 1.6M-parameter
model (hidden 192, 3 layers, 1,024-token byte-level BPE) trained 1,200 steps.
It answers a prompt with its corpus reply about half the time and otherwise
with what the corpus says to similar prompts: real sentences, and several
different ones to a prompt, which is what learning from thumbs needs (a bot
that always says the same thing gives its users nothing to choose between).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_WORD = re.compile(r"[a-z']+")
USER, ASSISTANT, END, PAD = "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT]

# The starter is far too small to follow a system prompt, so its template
# leaves system messages out rather than feed it text it never saw in training.
STARTER_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

INFO_FILE = "starter.json"


@dataclass
class StarterConfig:
    vocab_size: int = 1024  # byte-level BPE vocabulary, special tokens included
    hidden_size: int = 192  # width of the model
    num_layers: int = 3  # decoder layers
    num_heads: int = 6  # attention heads (head size 32)
    intermediate_size: int = 512  # MLP width
    max_length: int = 128  # tokens per training example (context is cut from the left)
    max_reply_tokens: int = 48  # corpus replies longer than this are not trained on
    steps: int = 1200  # optimizer steps
    batch_size: int = 64  # examples per step
    learning_rate: float = 4e-3  # AdamW peak learning rate
    warmup_steps: int = 40  # linear warm-up before cosine decay
    weight_decay: float = 0.01  # AdamW weight decay
    context_fraction: float = 0.1  # share of examples given an unrelated earlier exchange,
    # so the model learns to answer the last user turn of a longer chat
    neighbours: int = 6  # each prompt also trains on the replies of its most similar corpus prompts
    own_share: float = 0.5  # share of a prompt's training draws that are its own corpus replies
    seed: int = 0  # for the data order and initial weights
    eval_prompts: int = 0  # corpus prompts to measure the greedy match rate on (0: all)


ProgressFn = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the corpus --------------------------------------------------------------


def corpus_pairs() -> list[tuple[str, str]]:
    """(statement, reply) for every consecutive pair in the English corpus."""
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    pairs = []
    english = Path(DATA_DIRECTORY) / "english"
    for path in sorted(english.glob("*.yml")):
        with open(path, encoding="utf-8") as fp:
            data = yaml.safe_load(fp)
        for conversation in data.get("conversations", []):
            lines = [" ".join(str(x).split()) for x in conversation]
            for prompt, reply in zip(lines, lines[1:]):
                if prompt and reply:
                    pairs.append((prompt, reply))
    return pairs


def corpus_replies() -> dict[str, set[str]]:
    """Each corpus prompt and the set of replies the corpus gives it."""
    replies: dict[str, set[str]] = defaultdict(set)
    for prompt, reply in corpus_pairs():
        replies[prompt].add(reply)
    return dict(replies)


# -- tokenizer and model -------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with the chat tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END,
        pad_token=PAD,
        chat_template=STARTER_CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )


def make_model(tokenizer, config: StarterConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _encode_example(tokenizer, messages: list[dict], reply: str, max_length: int):
    """Token ids and labels that train on the reply tokens only."""
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply + END, add_special_tokens=False)["input_ids"]
    reply_ids = reply_ids[: max_length - 8]
    prompt_ids = prompt_ids[-(max_length - len(reply_ids)) :]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def similar_prompts(prompts: list[str], k: int) -> list[list[int]]:
    """For each prompt, the indices of the `k` other prompts most like it
    (cosine of TF-IDF word vectors; ties broken by position)."""
    import torch

    tokens = [_WORD.findall(p.lower()) for p in prompts]
    vocabulary = {w: i for i, w in enumerate(sorted({w for ws in tokens for w in ws}))}
    counts = torch.zeros(len(prompts), max(1, len(vocabulary)))
    for row, ws in enumerate(tokens):
        for w in ws:
            counts[row, vocabulary[w]] += 1
    idf = torch.log((1 + len(prompts)) / (1 + (counts > 0).sum(0))) + 1
    vectors = torch.nn.functional.normalize(counts * idf, dim=1)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-1.0)
    k = min(k, len(prompts) - 1)
    return similarity.topk(k, dim=1).indices.tolist() if k > 0 else [[] for _ in prompts]


def build_examples(pairs, tokenizer, config: StarterConfig, rng: random.Random) -> list[tuple[list, list]]:
    """Training examples grouped by prompt: one group per distinct prompt,
    holding its own corpus replies and the replies of its `neighbours` most
    similar prompts.

    Training draws one example per group each epoch (`_draw`), so a prompt
    with six replies in the corpus gets as many steps as a prompt with one.
    A bot that learns from thumbs can only move toward replies it already
    gives some of the time: trained on its own replies alone, the starter
    says the same thing to a prompt nearly every time (2 distinct replies in
    16 samples) and no taste has room to grow. With a share of the draws on
    what the corpus says to similar prompts, it answers in its corpus's own
    words but with several things to say. Replies longer than
    `max_reply_tokens` are left out: they would cost most of the compute for
    a few prompts.
    """
    by_prompt: dict[str, list] = defaultdict(list)
    for prompt, reply in pairs:
        by_prompt.setdefault(prompt, [])
        if len(tokenizer(reply, add_special_tokens=False)["input_ids"]) < config.max_reply_tokens:
            by_prompt[prompt].append(reply)
    prompts = [p for p, replies in by_prompt.items() if replies]
    neighbours = similar_prompts(prompts, config.neighbours)

    def encoded(prompt, replies):
        return [_encode_example(tokenizer, [{"role": "user", "content": prompt}], r, config.max_length)
                for r in replies]

    groups = [(encoded(p, by_prompt[p]), encoded(p, [r for j in near for r in by_prompt[prompts[j]]]))
              for p, near in zip(prompts, neighbours)]
    # Chats in the product are multi-turn: some examples carry an unrelated
    # earlier exchange before the turn to answer.
    n_context = int(len(groups) * config.context_fraction / (1 - config.context_fraction))
    for _ in range(n_context):
        (p0, r0), (p1, r1) = rng.sample(pairs, 2)
        messages = [
            {"role": "user", "content": p0},
            {"role": "assistant", "content": r0},
            {"role": "user", "content": p1},
        ]
        groups.append(([_encode_example(tokenizer, messages, r1, config.max_length)], []))
    return groups


def _draw(group: tuple[list, list], own_share: float, rng: random.Random):
    own, others = group
    return rng.choice(own if not others or rng.random() < own_share else others)


def _batch(examples, pad_id):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return input_ids, labels, attention


def _length_grouped_batches(groups, batch_size, own_share: float, rng: random.Random):
    """Endless batches of examples of similar length, one example per group an epoch.

    Most corpus replies are a few tokens and a few are paragraphs; random
    batches would pad every one to the longest and spend most of the CPU on
    padding. Each epoch: draw one example per group, shuffle, cut into
    windows of 16 batches, sort each window by length, serve its batches in
    random order.
    """
    batch_size = min(batch_size, len(groups))
    while True:
        order = [_draw(group, own_share, rng) for group in groups]
        rng.shuffle(order)
        window = batch_size * 16
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda ex: len(ex[0]))
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            rng.shuffle(batches)
            yield from batches


def train(model, groups, config: StarterConfig, pad_id: int, progress: ProgressFn) -> list[float]:
    import torch

    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    def lr_at(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses, start = [], time.monotonic()
    report_every = max(1, config.steps // 20)
    batches = _length_grouped_batches(groups, config.batch_size, config.own_share, rng)
    for step in range(config.steps):
        input_ids, labels, attention = _batch(next(batches), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % report_every == 0 or step + 1 == config.steps:
            elapsed = time.monotonic() - start
            eta = elapsed / (step + 1) * (config.steps - step - 1)
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            progress(
                f"starter model: step {step + 1}/{config.steps}, loss {recent:.3f}, "
                f"{elapsed:.0f}s elapsed, about {eta:.0f}s to go"
            )
    model.eval()
    return losses


# -- evaluation -----------------------------------------------------------------


def generate_replies(model, tokenizer, prompts: list[str], *, max_new_tokens=48, batch_size=128,
                     do_sample=False, temperature=1.0, seed=0) -> list[str]:
    """Replies to single-turn prompts, batched (greedy unless `do_sample`)."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts[i : i + batch_size]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def match_rate(model, tokenizer, replies: dict[str, set[str]] | None = None, limit: int = 0) -> float:
    """Share of corpus prompts whose greedy reply is one of their corpus replies.

    With `limit`, an evenly spaced sample of that many prompts is measured.
    """
    replies = replies or corpus_replies()
    prompts = sorted(replies)
    if limit and limit < len(prompts):
        prompts = prompts[:: len(prompts) // limit][:limit]
    got = generate_replies(model, tokenizer, prompts)
    return sum(g in replies[p] for p, g in zip(prompts, got)) / len(prompts)


# -- building and caching ---------------------------------------------------------


def starter_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models" / "starter"


def is_built(path: Path) -> bool:
    return (path / INFO_FILE).is_file()


@contextlib.contextmanager
def _build_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_starter(
    out_dir: str | os.PathLike,
    config: StarterConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    evaluate: bool = True,
) -> dict:
    """Train the starter model into `out_dir` (made complete or not at all).

    Returns the build facts written to ``starter.json``: parameters, build
    time, final loss and, with `evaluate`, the greedy match rate.
    """
    import torch

    config = config or StarterConfig()
    progress = progress or _print_progress
    out_dir = Path(out_dir)
    started = time.monotonic()
    rng = random.Random(config.seed)
    pairs = corpus_pairs()
    progress(f"starter model: training a tokenizer on {len(pairs)} corpus exchanges")
    tokenizer = train_tokenizer([t for pair in pairs for t in pair], config.vocab_size)
    groups = build_examples(pairs, tokenizer, config, rng)
    model = make_model(tokenizer, config)
    n_params = sum(p.numel() for p in model.parameters())
    progress(
        f"starter model: {n_params / 1e6:.2f}M parameters, {config.steps} steps of "
        f"{config.batch_size} over {len(groups)} prompts (torch threads: {torch.get_num_threads()})"
    )
    losses = train(model, groups, config, tokenizer.pad_token_id, progress)
    info = {
        "kind": "starter",
        "parameters": n_params,
        "config": dataclasses.asdict(config),
        "corpus_pairs": len(pairs),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": round(time.monotonic() - started, 1),
    }
    if evaluate:
        progress("starter model: measuring greedy replies on the corpus prompts")
        info["greedy_match_rate"] = round(match_rate(model, tokenizer, limit=config.eval_prompts), 4)
    info["build_seconds"] = round(time.monotonic() - started, 1)

    scratch = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    # The info file is written last: its presence is what marks a build complete.
    (scratch / INFO_FILE).write_text(json.dumps(info, indent=2))
    _publish(scratch, out_dir)
    return info


def _publish(scratch: Path, out_dir: Path) -> None:
    """Move a complete build into place (a rename: all or nothing)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(scratch, out_dir)


def ensure_starter(data_dir: str | os.PathLike, *, progress: ProgressFn | None = None,
                   config: StarterConfig | None = None) -> Path:
    """The starter model's directory, built first if it is not there yet."""
    path = starter_dir(data_dir)
    if is_built(path):
        return path
    progress = progress or _print_progress
    with _build_lock(path):
        if is_built(path):  # another process finished it while we waited
            return path
        for leftover in path.parent.glob(f"{path.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        progress(f"starter model: not built yet, building it once into {path} (a few minutes)")
        info = build_starter(path, config, progress=progress)
        progress(
            f"starter model: ready in {info['build_seconds']:.0f}s, greedy replies match the corpus "
            f"for {info.get('greedy_match_rate', float('nan')):.0%} of prompts"
        )
    return path
