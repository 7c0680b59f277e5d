"""Training data from feedback: one snapshot of the store, split and capped.

A retrain cycle reads the store once, up to a watermark (the last feedback id
it will use), and gets:

- **unpaired examples**: the conversation up to a reply, the reply, and the
  rater's latest thumb on it (what KTO and the reward model's BCE term use);
- **pairs**: two replies to the same prompt, one liked and one disliked (from
  regenerate, or two people sending the same opening line) for the reward
  model's Bradley-Terry term;
- **a prompt pool**: what people actually asked, rated or not, for PPO
  rollouts and for evaluation.

Everything is split by conversation, so a held-out conversation's turns never
leak into training. The split is a hash of the conversation id, so a
conversation stays on the same side in every run as feedback accumulates.
All past feedback is replayed each run (capped per rater), so the bot does not
forget what it learned from earlier thumbs.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from storage import Store


@dataclass
class DataConfig:
    heldout_fraction: float = 0.2  # share of conversations kept out of training
    per_rater_cap: int = 2000  # most recent rated replies kept per user or browser session
    max_prompts: int = 2000  # size of the prompt pool (newest first)


@dataclass
class Example:
    prompt: list[dict]  # messages up to the reply, as the model saw them
    reply: str
    label: bool  # True: thumbs-up
    conversation_id: str
    rater: str
    response_id: str
    feedback_id: int


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    conversation_id: str


@dataclass
class Snapshot:
    watermark: int
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    train_pairs: list[Pair] = field(default_factory=list)
    heldout_pairs: list[Pair] = field(default_factory=list)
    prompts: list[list[dict]] = field(default_factory=list)  # train side of the pool
    heldout_prompts: list[list[dict]] = field(default_factory=list)
    capped: int = 0  # rated replies dropped by the per-rater cap

    @property
    def examples(self) -> list[Example]:
        return self.train + self.heldout

    def counts(self) -> dict:
        ups = sum(e.label for e in self.examples)
        return {
            "watermark": self.watermark,
            "examples": len(self.examples),
            "up": ups,
            "down": len(self.examples) - ups,
            "train": len(self.train),
            "heldout": len(self.heldout),
            "train_pairs": len(self.train_pairs),
            "heldout_pairs": len(self.heldout_pairs),
            "prompts": len(self.prompts),
            "heldout_prompts": len(self.heldout_prompts),
            "raters": len({e.rater for e in self.examples}),
            "capped": self.capped,
        }


def is_heldout(conversation_id: str, fraction: float) -> bool:
    """Stable split: the same conversation lands on the same side every run."""
    digest = hashlib.sha256(conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def snapshot(store: Store, config: DataConfig | None = None, watermark: int | None = None) -> Snapshot:
    """Read feedback up to `watermark` (default: all of it) into a `Snapshot`."""
    config = config or DataConfig()
    if watermark is None:
        watermark = store.latest_feedback_id()
    rows = store.rated_responses(watermark)

    # Cap per rater: keep each rater's most recent rated replies.
    by_rater: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        rater = f"user:{row['user']}" if row["user"] else f"session:{row['session_id']}"
        by_rater[rater].append({**row, "rater": rater})
    kept, capped = [], 0
    for rater_rows in by_rater.values():
        rater_rows.sort(key=lambda r: r["feedback_id"])
        capped += max(0, len(rater_rows) - config.per_rater_cap)
        kept.extend(rater_rows[-config.per_rater_cap:] if config.per_rater_cap > 0 else [])
    kept.sort(key=lambda r: r["feedback_id"])

    snap = Snapshot(watermark=watermark, capped=capped)
    groups: dict[tuple[bool, str], list[dict]] = defaultdict(list)
    for row in kept:
        held = is_heldout(row["conversation_id"], config.heldout_fraction)
        example = Example(
            prompt=row["prompt"], reply=row["reply"], label=row["value"] > 0,
            conversation_id=row["conversation_id"], rater=row["rater"],
            response_id=row["response_id"], feedback_id=row["feedback_id"],
        )
        (snap.heldout if held else snap.train).append(example)
        groups[(held, row["prompt_hash"])].append(row)

    for (held, _), group in groups.items():
        pairs = _pairs(group)
        (snap.heldout_pairs if held else snap.train_pairs).extend(pairs)

    for item in store.user_prompts(config.max_prompts):
        held = is_heldout(item["conversation_id"], config.heldout_fraction)
        (snap.heldout_prompts if held else snap.prompts).append(item["prompt"])
    return snap


def _pairs(group: list[dict]) -> list[Pair]:
    """Every liked reply against every disliked one among replies to one prompt.

    A reply liked by one rater and disliked by another is left out, and two
    identical texts are never a pair.
    """
    ups = {r["response_id"]: r for r in group if r["value"] > 0}
    downs = {r["response_id"]: r for r in group if r["value"] < 0}
    mixed = ups.keys() & downs.keys()
    pairs = []
    for up_id, up in ups.items():
        if up_id in mixed:
            continue
        for down_id, down in downs.items():
            if down_id in mixed or up["reply"] == down["reply"]:
                continue
            pairs.append(Pair(prompt=up["prompt"], chosen=up["reply"], rejected=down["reply"],
                              conversation_id=up["conversation_id"]))
    return pairs


def encode(tokenizer, prompt: list[dict], reply: str | None = None, *, max_length: int = 512):
    """Token ids of the prompt (with the assistant turn opened) and of the reply
    closed by the end-of-sequence token. Long prompts lose their beginning."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if reply is None:
        return prompt_ids[-max_length:], []
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"][: max_length // 2]
    reply_ids = reply_ids + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_length - len(reply_ids)):]
    return prompt_ids, reply_ids
