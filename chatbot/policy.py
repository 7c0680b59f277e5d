"""Generation with the serving model, shared safely by every thread.

One model instance serves the chat page and the HTTP API. Generation holds a
lock for its whole length, so requests take turns on the model (on a 2-core
CPU they would only slow each other down if they ran at once) and the
version a request starts on is the one it finishes on. A request's prompt is
built and tokenized before it takes the lock (`build_prompt`), so a long
conversation being tokenized never holds up the reply being generated.
Waiting requests are bounded: past `max_waiting`, a request is refused with
`Busy` instead of queueing forever.

**Hot-swap.** `swap_to` changes the version that serves without a restart.
The adapter's files are read and checked outside the lock (the check every
version passes before it serves, `chatbot.adapters`); then, between
two generations (the one in progress finishes on the adapter it started
with), the new adapter is added beside the active one under a name never
used before in this process, made active, and the old one is deleted. New
requests see the new version; the version label of each reply is read under
the same lock, so it always names the adapter that wrote it. Going back to
v0 unloads every adapter and serves the plain base.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from chatbot.adapters import AdapterLoadError, check_adapter  # noqa: F401 - AdapterLoadError is raised from here too
from chatbot.models import GenerationSettings, LoadedModel  # noqa: F401 - GenerationSettings is served from here too
from chatbot.prompt import Prompt, PromptError, encode, fit, max_context  # noqa: F401 - PromptError is served from here too


class Busy(RuntimeError):
    """Too many requests are already waiting for the model."""


BASE_VERSION = "v0"


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


class Policy:
    """The model that chats. `stream` yields text as it is generated."""

    def __init__(self, loaded: LoadedModel, *, version: str = BASE_VERSION, max_waiting: int = 32):
        self.loaded = loaded
        self.base = loaded.model  # the plain base; `model` is it, or a PeftModel around it
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = version
        self._adapter: str | None = None  # the peft adapter name serving now, None for the base
        self._loads = itertools.count(1)
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        # Called as fn(outcome, generation) after every request: outcome is ok,
        # stopped, busy or error; generation is None unless it ran (metrics).
        self.listeners: list = []
        self.max_waiting = max_waiting
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.max_context = max_context(loaded.model, loaded.tokenizer)

    # -- hot-swap -------------------------------------------------------------

    def swap_to(self, version: str, path: str | None = None) -> dict:
        """Serve `version` from now on: the adapter in directory `path`, or the
        base for v0. Returns timings in seconds: ``read_s`` (files, outside
        the lock), ``wait_s`` (for the generation in progress), ``switch_s``
        (add, activate, delete under the lock). Raises `AdapterLoadError`
        and leaves the serving version as it was if anything is wrong."""
        started = time.perf_counter()
        prepared = None if version == BASE_VERSION else self._read_adapter(version, path)
        read_s = time.perf_counter() - started
        with self._swap_lock:
            name = None if prepared is None else f"{version}_{next(self._loads)}"
            waiting = time.perf_counter()
            with self._lock:
                locked = time.perf_counter()
                previous = self.version
                try:
                    self._switch(name, prepared)
                except Exception as exc:  # noqa: BLE001 - the old version keeps serving
                    raise AdapterLoadError(f"cannot load adapter {version} from {path}: {exc}") from exc
                self.version = version
                done = time.perf_counter()
        return {"version": version, "previous": previous, "read_s": round(read_s, 4),
                "wait_s": round(locked - waiting, 4), "switch_s": round(done - locked, 4),
                "total_s": round(done - started, 4)}

    def check_adapter(self, version: str, path: str | None) -> None:
        """Raise `AdapterLoadError` unless `version`'s files would load on the
        base this policy serves (see `chatbot.adapters`); changes nothing."""
        self._read_adapter(version, path)

    def _read_adapter(self, version: str, path: str | None) -> tuple:
        checked = check_adapter(version, path, base_config=self.base.config, base_class=type(self.base),
                                served=(self.loaded.name, self.loaded.path))
        return checked.config, checked.weights

    def _switch(self, name: str | None, prepared: tuple | None) -> None:
        """Under the lock: add `name` beside the active adapter, activate it,
        delete the old one. On failure, whatever was half-added is removed."""
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        old = self._adapter
        if prepared is None:  # back to the base
            if old is not None:
                self.model = _unwrap(self.model)
                self._adapter = None
            return
        config, weights = prepared
        wrapped_here = old is None
        try:
            if wrapped_here:
                self.model = PeftModel(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ValueError(f"weights do not fit the base: unexpected {result.unexpected_keys[:3]}, "
                                 f"missing {missing[:3]}")
            self.model.set_adapter(name)
        except Exception:
            if wrapped_here:
                self.model = _unwrap(self.model) if hasattr(self.model, "unload") else self.base
            elif name in self.model.peft_config:
                self.model.set_adapter(old)
                self.model.delete_adapter(name)
            self.model.eval()
            raise
        if old is not None:
            self.model.delete_adapter(old)
        self.model.eval()  # new LoRA modules are made in training mode: no dropout when serving
        self._adapter = name

    # -- prompts ------------------------------------------------------------

    def build_prompt(self, messages: list[dict], settings: GenerationSettings) -> Prompt:
        """The messages actually sent and their token ids, cut to fit the
        context beside the reply (`chatbot.prompt`); the settings' system
        prompt is added when the messages have none. Called outside the
        generation lock."""
        if settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": settings.system_prompt}, *messages]
        return fit(messages, self.max_context - int(settings.max_new_tokens), self._encode)

    def _encode(self, messages: list[dict]) -> list[int]:
        return encode(self.tokenizer, messages)

    # -- generation -----------------------------------------------------------

    def busy(self) -> bool:
        """True when a new request would be refused."""
        return self._in_flight >= self.max_waiting

    def _enter(self) -> None:
        with self._in_flight_lock:
            if self._in_flight >= self.max_waiting:
                self._notify("busy", None)
                raise Busy("the model is busy: too many requests are waiting, try again shortly")
            self._in_flight += 1

    def _notify(self, outcome: str, generation: "Generation | None") -> None:
        for listener in self.listeners:
            try:
                listener(outcome, generation)
            except Exception:  # noqa: BLE001 - counting must never fail a reply
                pass

    def _leave(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def generation_kwargs(self, input_ids, settings: GenerationSettings) -> dict:
        import torch

        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    generation_config=settings.generation_config(self.tokenizer))

    def finish_reason(self, new_tokens: list[int], settings: GenerationSettings, stopped: bool) -> str:
        if stopped:
            return "stopped"
        if new_tokens and new_tokens[-1] == self.tokenizer.eos_token_id:
            return "stop"
        return "length" if len(new_tokens) >= settings.max_new_tokens else "stop"

    def generate(self, messages: list[dict] | Prompt, settings: GenerationSettings | None = None) -> Generation:
        """The whole reply at once, on the calling thread: no streamer, no
        per-token decoding (the API's non-streaming path). `messages` may be
        a `Prompt` already built."""
        import torch

        settings = (settings or GenerationSettings()).validate()
        started = time.perf_counter()
        prompt = messages if isinstance(messages, Prompt) else self.build_prompt(messages, settings)
        ids = prompt.ids
        self._enter()
        try:
            input_ids = torch.tensor([ids], device=self.loaded.device)
            with self._lock:
                with torch.inference_mode():
                    output = self.model.generate(**self.generation_kwargs(input_ids, settings))
                version = self.version
        except BaseException:
            self._notify("error", None)
            raise
        finally:
            self._leave()
        new_tokens = output[0, len(ids):].tolist()
        result = Generation(
            text=self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
            version=version,
            prompt=prompt.messages,
            truncated_messages=prompt.dropped,
            prompt_tokens=len(ids),
            completion_tokens=len(new_tokens),
            finish_reason=self.finish_reason(new_tokens, settings, stopped=False),
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        self._notify("ok", result)
        return result

    def stream(self, messages: list[dict] | Prompt, settings: GenerationSettings | None = None,
               stop: threading.Event | None = None) -> "ReplyStream":
        """A reply to iterate over; its prompt is built here, on the calling
        thread, so `prompt` (what is sent, what was left out) is known before
        the first piece."""
        settings = (settings or GenerationSettings()).validate()
        prompt = messages if isinstance(messages, Prompt) else self.build_prompt(messages, settings)
        return ReplyStream(self, prompt, settings, stop or threading.Event())


class ReplyStream:
    """Iterate for text pieces; `result` holds the finished `Generation`.

    Closing the iterator early (a client went away) stops the generation.
    """

    def __init__(self, policy: Policy, prompt: Prompt, settings: GenerationSettings, stop: threading.Event):
        self.policy, self.prompt, self.settings, self.stop = policy, prompt, settings, stop
        self.result = Generation(prompt=prompt.messages, truncated_messages=prompt.dropped,
                                 prompt_tokens=len(prompt.ids))
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        policy, settings = self.policy, self.settings
        policy._enter()
        outcome = "error"
        try:
            result, stop = self.result, self.stop

            class _StopWhenAsked(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return stop.is_set()

            input_ids = torch.tensor([self.prompt.ids], device=policy.loaded.device)
            with policy._lock:
                result.version = policy.version
                streamer = TextIteratorStreamer(policy.tokenizer, skip_prompt=True, skip_special_tokens=True)
                kwargs = policy.generation_kwargs(input_ids, settings)
                kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]))
                output: dict = {}
                worker = threading.Thread(target=_run_generate, args=(policy.model, kwargs, output), daemon=True)
                worker.start()
                pieces, drained = [], False
                try:
                    for piece in streamer:
                        if not piece:
                            continue
                        if result.first_token_ms is None:
                            result.first_token_ms = (time.perf_counter() - self._started) * 1000
                        pieces.append(piece)
                        yield piece
                    drained = True
                finally:
                    if not drained:  # the consumer went away: stop before releasing the model
                        stop.set()
                    worker.join()
                    self._finish(pieces, output, input_ids.shape[1])
                if "error" in output:
                    raise output["error"]
                outcome = "stopped" if self.result.finish_reason == "stopped" else "ok"
        finally:
            policy._leave()
            self.result.latency_ms = (time.perf_counter() - self._started) * 1000
            policy._notify(outcome, self.result if outcome != "error" else None)


    def _finish(self, pieces: list[str], output: dict, prompt_length: int) -> None:
        result = self.result
        result.text = "".join(pieces).strip()
        sequences = output.get("sequences")
        new_tokens = sequences[0, prompt_length:].tolist() if sequences is not None else []
        result.completion_tokens = len(new_tokens)
        result.finish_reason = self.policy.finish_reason(new_tokens, self.settings, self.stop.is_set())


def _run_generate(model, kwargs, output: dict) -> None:
    import torch

    try:
        with torch.inference_mode():
            output["sequences"] = model.generate(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
        output["error"] = exc
        kwargs["streamer"].end()


def _unwrap(peft_model):
    """The plain base back from a PeftModel: every LoRA layer removed."""
    base = peft_model.unload()
    if hasattr(base, "peft_config"):  # left behind by peft; a later wrap would warn about it
        del base.peft_config
    return base
