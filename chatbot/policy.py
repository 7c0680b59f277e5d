"""Generation with the serving model, shared by every thread.

One model instance serves the chat page and the HTTP API through the
continuous-batching engine (`chatbot.engine`): requests join the running
batch between decode steps and leave when they end, each on the version it
started on. A request's prompt is built and tokenized on the calling thread
before it joins (`build_prompt`), so a long conversation being tokenized
never holds up the replies being generated. Waiting requests are bounded:
past `max_batch` rows and `max_waiting` in line, a request is refused with
`Busy` instead of queueing forever.

**Hot-swap.** `swap_to` changes the version new requests start on, without
a restart and without waiting for the batch to drain. The adapter's files
are read and checked first (the check every version passes before it
serves, `chatbot.adapters`); then, between two decode steps, the new adapter
is added beside the others under a name never used before in this process.
Replies already being written finish on their own adapter; an adapter no
reply uses any more is deleted between steps, so at rest only the serving
version is loaded. Each reply's version label is bound when it joins the
batch, so it always names the adapter that wrote it. Going back to v0
serves the plain base.

**Canary.** `start_canary` loads a candidate beside the serving version;
a request whose `Route` falls in the canary's share is bound to it on
admission (a conversation stays on the arm it started on; the same key
always gets the same arm). Promoting the canary's version moves the serving
label onto the adapter already loaded; ending the canary deletes it once
its last reply is written.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from dataclasses import dataclass

from chatbot.adapters import AdapterLoadError, check_adapter, fingerprint  # noqa: F401 - AdapterLoadError is raised from here too
from chatbot.cpu import own_thread, transpose_for_decoding
from chatbot.engine import PREFILL_TOKENS, Busy, Engine, Request  # noqa: F401 - Busy is raised from here too
from chatbot.models import GenerationSettings, LoadedModel  # noqa: F401 - GenerationSettings is served from here too
from chatbot.prompt import Prompt, PromptError, encode, fit, max_context  # noqa: F401 - PromptError is served from here too
from chatbot.streaming import Generation, ReplyStream


BASE_VERSION = "v0"


@dataclass(frozen=True)
class Route:
    """Who asks, for the choice of arm while a canary runs. `pinned`: the
    version a conversation's first reply came from (the conversation stays
    on that arm); else `key` (an identity: the same key always gets the same
    arm); neither: a fresh draw."""

    key: str | None = None
    pinned: str | None = None


@dataclass(frozen=True)
class Canary:
    """A candidate served to `share` of new conversations during live trial `trial`."""

    trial: int
    version: str
    adapter: str
    share: float

    def takes(self, route: Route | None) -> bool:
        if route is None:  # no arm asked for (internal callers): the serving version
            return False
        if route.pinned is not None:
            return route.pinned == self.version
        if route.key is None:
            return random.random() < self.share
        digest = hashlib.sha256(f"{self.trial}:{route.key}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.share


class Policy:
    """The model that chats. `stream` yields text as it is generated."""

    def __init__(self, loaded: LoadedModel, *, version: str = BASE_VERSION, max_batch: int = 8,
                 max_waiting: int = 32):
        self.loaded = loaded
        if getattr(loaded.device, "type", loaded.device) == "cpu":
            own_thread(transpose_for_decoding, loaded.model)  # serving only: a third off a decode step (chatbot.cpu)
        self.base = loaded.model  # the plain base; `model` is it, or a PeftModel around it
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = version
        self._adapter: str | None = None  # the peft adapter new requests start on, None for the base
        self._loaded_adapters: set[str] = set()
        self.canary: Canary | None = None
        self._loads = itertools.count(1)
        self._swap_lock = threading.Lock()
        # The adapter `check_adapter` read last, with its files' fingerprint:
        # a promotion checks a version, then swaps to it, and reads it once.
        self._checked: tuple | None = None
        # Called as fn(outcome, generation) after every request: outcome is ok,
        # stopped, busy or error; generation is None unless it ran (metrics).
        self.listeners: list = []
        self.max_context = max_context(loaded.model, loaded.tokenizer)
        self.engine = Engine(lambda: self.model, self.tokenizer, loaded.device, serving=self._serving,
                             release=self._release, max_batch=max_batch, max_waiting=max_waiting,
                             prefill_tokens=min(PREFILL_TOKENS, self.max_context))

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def max_waiting(self) -> int:
        return self.engine.max_waiting

    @property
    def _in_flight(self) -> int:
        """Requests running or waiting."""
        return self.engine.running + self.engine.waiting

    # -- hot-swap -------------------------------------------------------------

    def swap_to(self, version: str, path: str | None = None) -> dict:
        """Start new requests on `version` from now on: the adapter in
        directory `path`, or the base for v0. Returns timings in seconds:
        ``read_s`` (files, before the step lock), ``wait_s`` (for the decode
        step in progress), ``switch_s`` (adding the adapter between two
        steps). Raises `AdapterLoadError` and leaves the serving version as it
        was if anything is wrong."""
        started = time.perf_counter()
        canary = self.canary if self.canary is not None and self.canary.version == version else None
        # Torch work off the engine's thread runs on a thread of its own (chatbot.cpu: one OpenMP pool).
        prepared = None if version == BASE_VERSION or canary else self._prepared(version, path)
        read_s = time.perf_counter() - started
        with self._swap_lock:
            name = canary.adapter if canary else None if prepared is None else f"{version}_{next(self._loads)}"
            waiting = time.perf_counter()
            with self.engine.between_steps():
                locked = time.perf_counter()
                previous = self.version
                try:
                    own_thread(self._add, name, prepared)
                except Exception as exc:  # noqa: BLE001 - the old version keeps serving
                    raise AdapterLoadError(f"cannot load adapter {version} from {path}: {exc}") from exc
                if canary:  # promoted: the canary's adapter serves everyone now
                    self.canary = None
                    self.model.set_adapter(name)
                self.version, self._adapter = version, name
                self._release(self.engine.in_use())
                done = time.perf_counter()
        return {"version": version, "previous": previous, "read_s": round(read_s, 4),
                "wait_s": round(locked - waiting, 4), "switch_s": round(done - locked, 4),
                "total_s": round(done - started, 4)}

    def start_canary(self, trial: int, version: str, path: str, share: float) -> None:
        """Serve `version` (the adapter in `path`) to `share` of new
        conversations beside the serving version, in place of any canary
        before it. Raises `AdapterLoadError` and changes nothing when the
        files do not load."""
        if version == BASE_VERSION or version == self.version:
            raise AdapterLoadError(f"{version} cannot be a canary beside {self.version}")
        prepared = self._prepared(version, path)
        with self._swap_lock:
            name = f"{version}_{next(self._loads)}"
            with self.engine.between_steps():
                try:
                    own_thread(self._add, name, prepared, serve=False)
                except Exception as exc:  # noqa: BLE001 - the serving version goes on alone
                    raise AdapterLoadError(f"cannot load adapter {version} from {path}: {exc}") from exc
                self.canary = Canary(trial, version, name, share)
                self._release(self.engine.in_use())

    def end_canary(self) -> None:
        """New requests all go to the serving version; the canary's adapter is
        deleted once its last reply is written."""
        with self._swap_lock:
            with self.engine.between_steps():
                self.canary = None
                self._release(self.engine.in_use())

    def loaded_versions(self) -> list[str]:
        """The adapters in memory now (the serving one, and those whose last
        replies are still being written)."""
        return sorted(self._loaded_adapters)

    def check_adapter(self, version: str, path: str | None) -> None:
        """Raise `AdapterLoadError` unless `version`'s files would load on the
        base this policy serves (see `chatbot.adapters`); changes nothing
        that serves. What it read is kept for the swap that follows, while
        the files stay as they were."""
        prepared = own_thread(self._read_adapter, version, path)
        self._checked = (version, str(path), fingerprint(path), prepared)

    def _prepared(self, version: str, path: str | None) -> tuple:
        """`version`'s checked adapter: the one `check_adapter` read if its
        files have not changed since, else read and checked now."""
        checked, self._checked = self._checked, None
        if checked is not None and checked[:3] == (version, str(path), fingerprint(path)):
            return checked[3]
        return own_thread(self._read_adapter, version, path)

    def _read_adapter(self, version: str, path: str | None) -> tuple:
        checked = check_adapter(version, path, base_config=self.base.config, base_class=type(self.base),
                                served=(self.loaded.name, self.loaded.path))
        return checked.config, checked.weights

    def _serving(self, request: Request) -> tuple[str, str | None]:
        canary = self.canary
        if canary is not None and canary.takes(request.route):
            return canary.version, canary.adapter
        return self.version, self._adapter

    def _add(self, name: str | None, prepared: tuple | None, *, serve: bool = True) -> None:
        """Between steps: load adapter `name` beside the others (and make it
        peft's active one when it is to `serve` everyone). On failure,
        whatever was half-added is removed."""
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        if prepared is None:
            return
        config, weights = prepared
        wrapped_here = not self._loaded_adapters and not hasattr(self.model, "peft_config")
        try:
            # The new LoRA layers are made on the meta device and take the
            # checked weights as they are (no random init to overwrite, no
            # copy): this runs between two decode steps, while the batch waits.
            if wrapped_here:
                self.model = PeftModel(self.base, config, adapter_name=name, low_cpu_mem_usage=True)
            else:
                self.model.add_adapter(name, config, low_cpu_mem_usage=True)
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name, low_cpu_mem_usage=True)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ValueError(f"weights do not fit the base: unexpected {result.unexpected_keys[:3]}, "
                                 f"missing {missing[:3]}")
            if serve or wrapped_here:
                self.model.set_adapter(name)
        except Exception:
            if wrapped_here:
                self.model = _unwrap(self.model) if hasattr(self.model, "unload") else self.base
            elif name in self.model.peft_config:
                self.model.delete_adapter(name)
            self.model.eval()
            raise
        self.model.eval()  # new LoRA modules are made in training mode: no dropout when serving
        self._loaded_adapters.add(name)

    def _release(self, in_use: set) -> None:
        """Between steps: delete every adapter neither serving (or on canary)
        nor in use by a reply still being written; back to the plain base
        when none is left."""
        keep = {self._adapter, self.canary.adapter if self.canary else None}
        for name in sorted(self._loaded_adapters - in_use - keep):
            if len(self._loaded_adapters) == 1:
                self.model = _unwrap(self.model)
            else:
                if self.model.active_adapter == name:
                    rest = self._loaded_adapters - {name}
                    self.model.set_adapter(self._adapter if self._adapter in rest else next(iter(rest)))
                self.model.delete_adapter(name)
            self._loaded_adapters.discard(name)

    # -- prompts ------------------------------------------------------------

    def build_prompt(self, messages: list[dict], settings: GenerationSettings) -> Prompt:
        """The messages actually sent and their token ids, cut to fit the
        context beside the reply (`chatbot.prompt`); the settings' system
        prompt is added when the messages have none. Called on the caller's
        thread, before the request joins the batch."""
        if settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": settings.system_prompt}, *messages]
        return fit(messages, self.max_context - int(settings.max_new_tokens), self._encode)

    def _encode(self, messages: list[dict]) -> list[int]:
        return encode(self.tokenizer, messages)

    # -- generation -----------------------------------------------------------

    def busy(self) -> bool:
        """True when a new request would be refused."""
        return self.engine.busy()

    def _notify(self, outcome: str, generation: "Generation | None") -> None:
        for listener in self.listeners:
            try:
                listener(outcome, generation)
            except Exception:  # noqa: BLE001 - counting must never fail a reply
                pass

    def _submit(self, prompt: Prompt, settings: GenerationSettings, stop: threading.Event,
                route: Route | None = None) -> Request:
        try:
            return self.engine.submit(Request(list(prompt.ids), settings, stop, route=route))
        except Busy:
            self._notify("busy", None)
            raise

    def _result(self, request: Request, prompt: Prompt, text: str) -> Generation:
        first = request.first_token_at
        return Generation(
            text=text.strip(), version=request.version, prompt=prompt.messages, truncated_messages=prompt.dropped,
            prompt_tokens=len(prompt.ids), completion_tokens=len(request.tokens),
            finish_reason=request.finish_reason or "stopped",
            latency_ms=(time.perf_counter() - request.submitted) * 1000,
            first_token_ms=None if first is None else (first - request.submitted) * 1000)

    def generate(self, messages: list[dict] | Prompt, settings: GenerationSettings | None = None, *,
                 route: Route | None = None) -> Generation:
        """The whole reply at once (the API's non-streaming path): no per-token
        decoding. `messages` may be a `Prompt` already built; `route` says
        who asks, for the canary's share."""
        settings = (settings or GenerationSettings()).validate()
        prompt = messages if isinstance(messages, Prompt) else self.build_prompt(messages, settings)
        request = self._submit(prompt, settings, threading.Event(), route)
        try:
            while request.events.get() is not None:
                pass
        except BaseException:
            request.stop.set()
            self._notify("error", None)
            raise
        if request.error is not None:
            self._notify("error", None)
            raise request.error
        result = self._result(request, prompt, self.tokenizer.decode(request.tokens, skip_special_tokens=True))
        self._notify("ok", result)
        return result

    def stream(self, messages: list[dict] | Prompt, settings: GenerationSettings | None = None,
               stop: threading.Event | None = None, *, route: Route | None = None) -> "ReplyStream":
        """A reply to iterate over; its prompt is built here, on the calling
        thread, so `prompt` (what is sent, what was left out) is known before
        the first piece."""
        settings = (settings or GenerationSettings()).validate()
        prompt = messages if isinstance(messages, Prompt) else self.build_prompt(messages, settings)
        return ReplyStream(self, prompt, settings, stop or threading.Event(), route)


def _unwrap(peft_model):
    """The plain base back from a PeftModel: every LoRA layer removed."""
    base = peft_model.unload()
    if hasattr(base, "peft_config"):  # left behind by peft; a later wrap would warn about it
        del base.peft_config
    return base
