"""The preference-pair rule and the rows in TRL's shapes, in one place for
the export (`Store.export_jsonl`) and for training (`online_rl.data`,
`online_rl.kto`).

**Pairs.** Replies count as alternatives of one another when their prompt
messages are identical (regenerate in the chat, or the same opening line
from two people). Among the rated replies to one prompt, every liked reply is
paired with every disliked one; a reply one rater liked and another disliked
is left out, and two identical texts are never a pair.

**Corrections.** A reply a rater wrote in place of the bot's (with their
thumbs-down) is preferred to the reply it corrects: one more pair, and one
more liked reply to that prompt (a supervised target for the policy).
"""

from __future__ import annotations

from typing import Iterable


def preference_pairs(rows: Iterable[dict]) -> list[tuple[dict, dict]]:
    """(chosen, rejected) rows among rated replies to one prompt: each row has
    ``response_id``, ``value`` (+1 or -1) and ``reply``; several rows of one
    reply (several raters) count as one reply. In response-id order."""
    rows = list(rows)
    ups = {r["response_id"]: r for r in rows if r["value"] > 0}
    downs = {r["response_id"]: r for r in rows if r["value"] < 0}
    mixed = ups.keys() & downs.keys()
    return [(ups[up], downs[down]) for up in sorted(ups.keys() - mixed) for down in sorted(downs.keys() - mixed)
            if ups[up]["reply"] != downs[down]["reply"]]


def corrections(rows: Iterable[dict]) -> list[tuple[dict, str]]:
    """(rated row, corrected text) for every row that carries a correction
    different from the reply it corrects."""
    return [(r, r["correction"]) for r in rows if r.get("correction") and r["correction"] != r["reply"]]


def assistant(text: str) -> list[dict]:
    """A completion in TRL's conversational shape."""
    return [{"role": "assistant", "content": text}]


def unpaired_row(prompt: list[dict], reply: str, liked: bool) -> dict:
    """TRL's conversational unpaired row (KTO): ``{prompt, completion, label}``."""
    return {"prompt": prompt, "completion": assistant(reply), "label": bool(liked)}


def paired_row(prompt: list[dict], chosen: str, rejected: str) -> dict:
    """TRL's conversational preference row (reward modelling, DPO):
    ``{prompt, chosen, rejected}``."""
    return {"prompt": prompt, "chosen": assistant(chosen), "rejected": assistant(rejected)}
