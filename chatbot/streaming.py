"""A reply as it is written, and what it was (`Generation`).

`Policy.stream` returns a `ReplyStream`, which submits the request to the
engine when iterated and turns the token ids it receives into text pieces
(`Pieces`), one decode for all the tokens that arrived together."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from chatbot.models import GenerationSettings
    from chatbot.policy import Policy, Route
    from chatbot.prompt import Prompt


@dataclass
class Generation:
    """What one reply was: its text, the version that wrote it, and its cost."""

    text: str = ""
    version: str = "v0"
    prompt: list[dict] = field(default_factory=list)
    truncated_messages: int = 0  # messages of the conversation left out to fit the context
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | stopped
    latency_ms: float = 0.0
    first_token_ms: float | None = None


class ReplyStream:
    """Iterate for text pieces; `result` holds the finished `Generation`.

    Closing the iterator early (a client went away) stops the generation:
    the reply's row leaves the batch at the next step."""

    def __init__(self, policy: Policy, prompt: Prompt, settings: GenerationSettings, stop: threading.Event,
                 route: Route | None = None):
        self.policy, self.prompt, self.settings, self.stop, self.route = policy, prompt, settings, stop, route
        self.result = Generation(prompt=prompt.messages, truncated_messages=prompt.dropped,
                                 prompt_tokens=len(prompt.ids))

    def __iter__(self) -> Iterator[str]:
        policy = self.policy
        request = policy._submit(self.prompt, self.settings, self.stop, self.route)
        outcome, pieces = "error", Pieces(policy.tokenizer)
        try:
            ended = False
            while not ended:
                tokens = _drain(request.events)  # under load, several tokens: one decode for all
                if tokens[-1] is None:
                    ended = True
                    tokens.pop()
                if tokens and not pieces.tokens:  # admitted: the version that writes this reply is known
                    self.result.version = request.version
                if tokens and (piece := pieces.add(tokens)):
                    yield piece
            if request.error is not None:
                raise request.error
            if tail := pieces.rest():
                yield tail
            outcome = "stopped" if request.finish_reason == "stopped" else "ok"
        except GeneratorExit:  # the consumer went away
            outcome = "stopped"
            raise
        finally:
            request.stop.set()  # the row leaves the batch at the next step
            self.result = policy._result(request, self.prompt, pieces.text)
            policy._notify(outcome, self.result if outcome != "error" else None)


class Pieces:
    """Token ids in, text pieces out: a piece ends at a space or a line
    break, so a word whose tokens decode differently once complete (a
    multi-byte character, a word split in several tokens) is sent whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], 0

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.text
        cut = max(text.rfind(" "), text.rfind("\n")) + 1
        if cut <= self.sent or text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:cut], cut
        return piece

    def rest(self) -> str:
        text = self.text
        piece, self.sent = text[self.sent:], len(text)
        return piece


def _drain(events: queue.SimpleQueue) -> list:
    """The next event, waiting for it, and every one already queued after it."""
    out = [events.get()]
    while out[-1] is not None:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            break
    return out
