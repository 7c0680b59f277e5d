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
reply uses any more is deleted between steps, except one, kept as the
*spare*: the next version with the same LoRA config is copied into it
before the step lock is taken (no row uses it, so the batch goes on), and
the swap between two steps only changes which adapter new rows start on.
Adding an adapter between steps held the batch 35-60 ms on the starter;
the spare costs one adapter's memory (0.7 MB on the starter, 34 MB for
rank 16 on every projection of a 0.5B model). Each reply's version label
is bound when it joins the batch, so it always names the adapter that
wrote it. Going back to v0 serves the plain base, and unloads the spare.

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
from chatbot.cpu import decode_threads, own_thread, transpose_for_decoding
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
        threads = None
        if getattr(loaded.device, "type", loaded.device) == "cpu":
            own_thread(transpose_for_decoding, loaded.model)  # serving only: a third off a decode step (chatbot.cpu)
            threads = decode_threads(loaded.model)
        self.base = loaded.model  # the plain base; `model` is it, or a PeftModel around it
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = version
        self._adapter: str | None = None  # the peft adapter new requests start on, None for the base
        self._loaded_adapters: set[str] = set()
        self._versions: dict[str, str] = {}  # loaded adapter name -> the version it holds
        self._spare: str | None = None  # a loaded adapter nobody uses, kept to copy the next version into
        self._claimed: str | None = None  # the spare while a version is copied into it
        self._spare_lock = threading.Lock()  # the spare is claimed off the step lock, released on the engine's thread
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
                             prefill_tokens=min(PREFILL_TOKENS, self.max_context), threads=threads,
                             context=self.max_context)

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
        step in progress), ``switch_s`` (between two steps: adding the
        adapter, or only switching to the spare it was copied into, then
        ``into_spare`` is true). Raises `AdapterLoadError` and leaves the
        serving version as it was if anything is wrong."""
        started = time.perf_counter()
        canary = self.canary if self.canary is not None and self.canary.version == version else None
        # Torch work off the engine's thread runs on a thread of its own (chatbot.cpu: one OpenMP pool).
        prepared = None if version == BASE_VERSION or canary else self._prepared(version, path)
        read_s = time.perf_counter() - started
        with self._swap_lock:
            name = canary.adapter if canary else None if prepared is None else self._fill_spare(version, prepared)
            copied = name is not None and not canary
            if prepared is not None and not canary and name is None:
                name = f"{version}_{next(self._loads)}"
            waiting = time.perf_counter()
            with self.engine.between_steps():
                locked = time.perf_counter()
                previous = self.version
                try:
                    own_thread(self._add, name, None if copied else prepared)
                except Exception as exc:  # noqa: BLE001 - the old version keeps serving
                    raise AdapterLoadError(f"cannot load adapter {version} from {path}: {exc}") from exc
                if canary or copied:  # already loaded: it serves everyone now
                    self.canary = None if canary else self.canary
                    self.model.set_adapter(name)
                self.version, self._adapter = version, name
                with self._spare_lock:
                    self._claimed = None
                self._release(self.engine.in_use())
                done = time.perf_counter()
        return {"version": version, "previous": previous, "read_s": round(read_s, 4),
                "wait_s": round(locked - waiting, 4), "switch_s": round(done - locked, 4),
                "total_s": round(done - started, 4), "into_spare": copied}

    def _fill_spare(self, version: str, prepared: tuple) -> str | None:
        """Off the step lock: copy `version`'s weights into the spare adapter
        when its LoRA config is the same, and return its name (it is no
        spare any more); None when there is no spare that fits. No row uses
        the spare, so the batch runs on while it is written."""
        from peft.utils import get_peft_model_state_dict

        config, weights = prepared
        with self._spare_lock:
            name = self._spare
            if name is None or not _same_lora(self.model.peft_config.get(name), config):
                return None
            self._spare = None  # claimed: `_release` leaves it alone (it is in no row and not free)
            self._claimed = name
        try:
            own_thread(_copy_into, get_peft_model_state_dict(self.model, adapter_name=name), weights)
        except Exception:  # noqa: BLE001 - a fresh adapter is added instead
            with self._spare_lock:
                self._claimed = None
            self._delete_between_steps(name)
            return None
        self._versions[name] = version
        return name  # still claimed: `swap_to` lets go of it once it serves

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
        """The versions whose adapters are in memory now (the serving one, the
        canary, and those whose last replies are still being written); the
        spare holds none."""
        return sorted({self._versions[n] for n in self._loaded_adapters if n != self._spare})

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
        self._versions[name] = name.rsplit("_", 1)[0]

    def _release(self, in_use: set) -> None:
        """Between steps: delete every adapter neither serving (or on canary)
        nor in use by a reply still being written, but one kept as the spare
        while an adapter serves; back to the plain base when none is left."""
        with self._spare_lock:
            if self._adapter is None:  # serving the plain base: no spare either
                self._spare = None
            keep = {self._adapter, self.canary.adapter if self.canary else None, self._spare, self._claimed}
            # Oldest load first (names end in the load's number).
            free = sorted(self._loaded_adapters - in_use - keep, key=lambda n: int(n.rsplit("_", 1)[1]))
            if free and self._claimed is None and self._adapter is not None:
                # The adapter replaced last is the spare (see the module's docstring): it
                # has the config the next version of the same training most likely has.
                if self._spare is not None:
                    free.insert(0, self._spare)
                self._spare = free.pop()
        for name in free:
            self._delete(name)

    def _delete(self, name: str) -> None:
        """Between steps: unload adapter `name` (back to the plain base when it is the last)."""
        if len(self._loaded_adapters) == 1:
            self.model = _unwrap(self.model)
        else:
            if self.model.active_adapter == name:
                rest = self._loaded_adapters - {name}
                self.model.set_adapter(self._adapter if self._adapter in rest else next(iter(rest)))
            self.model.delete_adapter(name)
        self._loaded_adapters.discard(name)
        self._versions.pop(name, None)

    def _delete_between_steps(self, name: str) -> None:
        with self.engine.between_steps():
            with self._spare_lock:
                if self._spare == name:
                    self._spare = None
            if name in self._loaded_adapters and name not in self.engine.in_use():
                self._delete(name)

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


def _same_lora(loaded, wanted) -> bool:
    """Whether an adapter loaded with peft config `loaded` computes what one
    with config `wanted` would, given the same weights: every field but the
    bookkeeping ones is equal."""
    if loaded is None:
        return False
    ignored = {"base_model_name_or_path", "revision", "inference_mode", "runtime_config"}

    def fields(config):
        return {k: v for k, v in config.to_dict().items() if k not in ignored}

    return fields(loaded) == fields(wanted)


def _copy_into(target: dict, weights: dict) -> None:
    """Write `weights` into the tensors of `target` (a state dict sharing the
    adapter's storage); the names and shapes were checked (`chatbot.adapters`)."""
    import torch

    if set(target) != set(weights):
        raise ValueError("the weights do not name the spare's tensors")
    with torch.no_grad():
        for key, tensor in weights.items():
            target[key].copy_(tensor)


def _unwrap(peft_model):
    """The plain base back from a PeftModel: every LoRA layer removed."""
    base = peft_model.unload()
    if hasattr(base, "peft_config"):  # left behind by peft; a later wrap would warn about it
        del base.peft_config
    return base
