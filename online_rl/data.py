"""Training data from feedback: one snapshot of the store, split and weighted.

A retrain cycle reads the store once, up to a watermark (the last feedback id
it will use), and gets:

- **unpaired examples**: the conversation up to a reply, the reply, and the
  rater's latest thumb on it (what KTO and the reward model's BCE term use);
- **pairs**: two replies to the same prompt, one liked and one disliked (from
  regenerate, or two people sending the same opening line) for the reward
  model's Bradley-Terry term;
- **corrections**: a reply a rater wrote in place of the bot's becomes a
  liked example (so the policy's supervised anchor, `Snapshot.liked`, learns
  to write it) and a pair over the reply it corrects;
- **a prompt pool**: what people actually asked, rated or not, for PPO
  rollouts and for evaluation.

Thumbs and pairs are split by conversation, so a held-out conversation's
turns never leak into training; the prompt pool is split by the prompt
itself, so that no update ever samples from a prompt the gate judges on.
People send the same opening lines in many conversations: split by
conversation, a prompt the policy had been trained on in earlier cycles
came back as a held-out one, and the gate judged the candidate's language
on replies it had learned by heart (the base NLL per token it saw was
0.48 where new prompts gave 0.51). Both splits are hashes, so a
conversation or a prompt stays on the same side in every run as feedback
accumulates.
All past feedback is replayed each run, so the bot does not forget what it
learned from earlier thumbs.

Every example, pair and pool prompt carries a weight (`online_rl.influence`):
no rater holds more than ``max(max_rater_share, 1 / raters)`` of the weight
of each side's thumbs, pairs and prompts, however many rows they gave. A
rater over the bound keeps every row, down-weighted; nothing is dropped.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from online_rl.influence import rater_shares, rater_weights
from storage import Store, shapes


@dataclass
class DataConfig:
    heldout_fraction: float = 0.2  # share of conversations kept out of training
    # The most of a run's data (thumbs, pairs, prompts, liked replies) one
    # rater may hold, as a share of its weight; with fewer raters than
    # 1 / max_rater_share, an equal share each. 1 turns the bound off.
    max_rater_share: float = 0.05
    max_prompts: int = 2000  # size of the prompt pool (newest first)

    def validate(self) -> "DataConfig":
        if not 0 < self.max_rater_share <= 1:
            raise ValueError(f"max_rater_share is a share of the data in (0, 1] (1 turns the bound off), "
                             f"got {self.max_rater_share}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        return self


@dataclass
class Example:
    prompt: list[dict]  # messages up to the reply, as the model saw them
    reply: str
    label: bool  # True: thumbs-up
    conversation_id: str
    rater: str
    response_id: str
    feedback_id: int
    weight: float = 1.0  # the rater bound's weight among the examples of its side (they average 1)
    corrected: bool = False  # a reply a rater wrote in place of the bot's (always liked)


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    conversation_id: str
    raters: tuple[str, ...] = ()  # who liked the chosen reply and who disliked the rejected one
    weight: float = 1.0  # the rater bound's weight among the pairs of its side (they average 1)


@dataclass
class Snapshot:
    watermark: int
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    train_pairs: list[Pair] = field(default_factory=list)
    heldout_pairs: list[Pair] = field(default_factory=list)
    prompts: list[list[dict]] = field(default_factory=list)  # train side of the pool
    prompt_raters: list[tuple[str, ...]] = field(default_factory=list)  # who sent each of `prompts`
    prompt_weights: list[float] = field(default_factory=list)  # the rater bound's weight of each of `prompts`
    heldout_prompts: list[list[dict]] = field(default_factory=list)
    max_rater_share: float = 1.0  # the bound the weights were made with

    def liked(self) -> tuple[list[tuple[list[dict], str]], list[float]]:
        """The liked replies of the training side as (prompt, reply), and
        their weights under the same rater bound (the language anchor's data)."""
        kept = [e for e in self.train if e.label and e.reply.strip()]
        return [(e.prompt, e.reply) for e in kept], rater_weights([e.rater for e in kept], self.max_rater_share)

    def corrections(self) -> tuple[list[tuple[list[dict], str]], list[float]]:
        """The training side's corrections as (prompt, the reply a person
        wrote instead), and their weights under the rater bound: the policy's
        supervised targets."""
        kept = [e for e in self.train if e.corrected]
        return [(e.prompt, e.reply) for e in kept], rater_weights([e.rater for e in kept], self.max_rater_share)

    def rater_shares(self) -> dict:
        """The top raters of the reward model's thumbs and of the policy's
        prompts (training side), with their share before and after the bound."""
        return {
            "max_rater_share": self.max_rater_share,
            "thumbs": rater_shares([e.rater for e in self.train], self.max_rater_share),
            "prompts": rater_shares(self.prompt_raters, self.max_rater_share),
        }

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
            "corrections": sum(e.corrected for e in self.examples),
        }


def stable_unit(key: str) -> float:
    """A number in [0, 1) that `key` always maps to (a hash): stable splits."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def is_heldout(key: str, fraction: float) -> bool:
    """Stable split: the same conversation (or prompt hash) lands on the same side every run."""
    return stable_unit(key) < fraction


def rater_key(user: str | None, session_id: str | None) -> str:
    """Who a row counts for: the user, else the session (`chatbot.identity` decides which is set)."""
    return f"user:{user}" if user else f"session:{session_id}"


def snapshot(store: Store, config: DataConfig | None = None, watermark: int | None = None) -> Snapshot:
    """Read feedback up to `watermark` (default: all of it) into a `Snapshot`."""
    config = (config or DataConfig()).validate()
    if watermark is None:
        watermark = store.latest_feedback_id()
    snap = Snapshot(watermark=watermark, max_rater_share=config.max_rater_share)
    groups: dict[tuple[bool, str], list[dict]] = defaultdict(list)
    for row in store.rated_responses(watermark):
        row["rater"] = rater_key(row["user"], row["session_id"])
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
        for row, text in shapes.corrections(group):  # a liked reply, and a pair over the one it corrects
            (snap.heldout if held else snap.train).append(Example(
                prompt=row["prompt"], reply=text, label=True, conversation_id=row["conversation_id"],
                rater=row["rater"], response_id=row["response_id"], feedback_id=row["feedback_id"], corrected=True))
            (snap.heldout_pairs if held else snap.train_pairs).append(Pair(
                prompt=row["prompt"], chosen=text, rejected=row["reply"], conversation_id=row["conversation_id"],
                raters=(row["rater"], row["rater"])))

    for item in store.user_prompts(config.max_prompts):
        if is_heldout(item["prompt_hash"], config.heldout_fraction):
            snap.heldout_prompts.append(item["prompt"])
        else:
            snap.prompts.append(item["prompt"])
            snap.prompt_raters.append(tuple(rater_key(r["user"], r["session_id"]) for r in item["raters"]))

    # Each side is weighted on its own: the training side trains the policy's
    # reward model and the policy, the held-out side the judge.
    share = config.max_rater_share
    for examples in (snap.train, snap.heldout):
        for example, weight in zip(examples, rater_weights([e.rater for e in examples], share)):
            example.weight = weight
    for pairs in (snap.train_pairs, snap.heldout_pairs):
        for pair, weight in zip(pairs, rater_weights([p.raters for p in pairs], share)):
            pair.weight = weight
    snap.prompt_weights = rater_weights(snap.prompt_raters, share)
    return snap


def _pairs(group: list[dict]) -> list[Pair]:
    """The pairs among replies to one prompt (`storage.shapes`' rule)."""
    return [Pair(prompt=up["prompt"], chosen=up["reply"], rejected=down["reply"],
                 conversation_id=up["conversation_id"], raters=(up["rater"], down["rater"]))
            for up, down in shapes.preference_pairs(group)]


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
