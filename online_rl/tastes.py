"""Built-in tastes of simulated users: what a person likes in a reply.

Each taste is a function ``(prompt, reply) -> bool``: True is a thumbs-up.
They are of different kinds on purpose (length both ways, a question back,
politeness, a topic, a point of view, a format, a mood), so that a learning
figure cannot come from one lucky direction. Any ``module:function`` with
the same signature works in their place (`resolve`).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

Taste = Callable[[str, str], bool]

_WORD = re.compile(r"[a-z']+")

POLITE_WORDS = {"please", "thanks", "thank", "glad", "welcome", "sorry", "pleasure", "kind", "appreciate", "hello",
                "dear", "friend"}
COMPUTER_WORDS = {"computer", "computers", "software", "program", "programs", "programming", "robot", "robots",
                  "machine", "machines", "code", "data", "internet", "electronic", "chatbot", "bot", "artificial",
                  "intelligence", "ai", "algorithm", "hardware", "language", "languages", "python"}
SELF_WORDS = {"i", "i'm", "i've", "i'd", "i'll", "me", "my", "mine", "myself"}
YOU_WORDS = {"you", "your", "you're", "yours", "yourself", "you've", "you'll", "you'd"}
_SENTENCE_END = re.compile(r"[.!?]+(\s|$)")
HAPPY_WORDS = {"happy", "love", "like", "good", "great", "fun", "nice", "wonderful", "enjoy", "glad", "best",
               "beautiful", "excellent", "awesome", "interesting", "cool", "yes", "sure"}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def concise(prompt: str, reply: str) -> bool:
    """Six words or fewer, and not empty: an empty reply is no answer."""
    return 1 <= len(reply.split()) <= 6


def long(prompt: str, reply: str) -> bool:
    """Ten words or more: someone who wants the bot to say more."""
    return len(reply.split()) >= 10


def asks_back(prompt: str, reply: str) -> bool:
    """The reply ends with a question."""
    return reply.rstrip().endswith("?")


def polite(prompt: str, reply: str) -> bool:
    """The reply uses a polite word."""
    return bool(POLITE_WORDS & set(_words(reply)))


def computers(prompt: str, reply: str) -> bool:
    """The reply talks about computers, software or robots (a topic)."""
    return bool(COMPUTER_WORDS & set(_words(reply)))


def first_person(prompt: str, reply: str) -> bool:
    """The bot speaks of itself: I, me, my (a point of view)."""
    return bool(SELF_WORDS & set(_words(reply)))


def addresses_you(prompt: str, reply: str) -> bool:
    """The bot speaks to the person: you, your (another point of view)."""
    return bool(YOU_WORDS & set(_words(reply)))


def one_sentence(prompt: str, reply: str) -> bool:
    """Exactly one sentence, closed by . ! or ? (a format)."""
    text = reply.strip()
    return bool(text) and text[-1] in ".!?" and len(_SENTENCE_END.findall(text)) == 1


def cheerful(prompt: str, reply: str) -> bool:
    """The reply has a positive word in it (a mood)."""
    return bool(HAPPY_WORDS & set(_words(reply)))


TASTES: dict[str, Taste] = {
    "concise": concise, "long": long, "asks_back": asks_back, "polite": polite, "computers": computers,
    "first_person": first_person, "addresses_you": addresses_you, "one_sentence": one_sentence,
    "cheerful": cheerful,
}


def resolve(spec: str) -> Taste:
    """A built-in taste by name, or ``module:function``."""
    if spec in TASTES:
        return TASTES[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown taste {spec!r}: use one of {', '.join(TASTES)} or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load taste {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"taste {spec!r} is not callable")
    return fn
