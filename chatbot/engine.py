"""Continuous batching: every reply being written shares one forward pass a step.

One engine thread owns the model. Requests wait in a bounded line; between
two decode steps the engine admits as many as the batch has room for (at most
`max_batch` rows); each step then writes the next token of every row at once
and reads the prompts of the newcomers (`chatbot.batch`: packed into the same
forward pass where the model allows, `chatbot.packed`; else in a left-padded
pass of their own). A row leaves the batch the step it ends (an end token,
its length cap, or its `stop` event: a stop button or a client that went away
frees its slot at once), and the next waiting request takes its place.

**An adapter per row.** Each request is bound, when it is admitted, to the
version serving at that moment (its peft adapter name, or the base); each
row of a forward pass gets its own adapter (`chatbot.lora_rows`, or peft's
``adapter_names=`` where that does not apply), so replies that started on v3
finish on v3 while new ones start on v4 in the same forward pass. A hot-swap
happens between two steps (`between_steps`), never inside one, and never
waits for the batch to drain.

**Why not transformers' own continuous batching.** `ContinuousBatchingManager`
owns its loop and its batch and has no hook for the adapter each request is
bound to (docs/serving.md). Sampling uses the same
`transformers` warpers `generate` applies for our `GenerationConfig`
(temperature, then top-p; every other field is off), so serving samples
exactly as the training rollouts do.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from chatbot import packed
from chatbot.batch import PackedBatch, PaddedBatch
from chatbot.lora_rows import BASE_ROW, lora_layers, rows_on_adapters, supported
from chatbot.models import forward_arguments

# Newcomers' prompts read in one forward pass when several requests join the
# batch at once, in rows x longest prompt (the policy caps it at the model's
# context, see `chatbot.batch.prefill_groups`).
PREFILL_TOKENS = 1024


class Busy(RuntimeError):
    """Too many requests are already waiting for the model."""


@dataclass(eq=False)
class Request:
    """One reply to write. `events` receives each new token id, then None."""

    ids: list[int]
    settings: object  # chatbot.models.GenerationSettings
    stop: threading.Event = field(default_factory=threading.Event)
    version: str = ""  # the version that writes it, bound on admission
    adapter: str | None = None
    route: object = None  # who asks, for the choice between arms while a canary runs (chatbot.policy.Route)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | stopped
    error: BaseException | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # An adapted reply served within the base's words has a shadow: a row on
    # the base fed the same tokens, whose logits bound the reply's draw
    # (`GenerationSettings.served_probs`). Each names the other here.
    twin: "Request | None" = None
    shadow: bool = False  # this row is a shadow: no client reads it


class Engine:
    """The batch and the thread that runs it.

    `serving(request)` names the (version, adapter) a new request is bound to;
    `release(in_use)` is called between steps with the adapter names rows
    still use, so that a retired adapter can be deleted once its last reply
    is written."""

    def __init__(self, model_fn: Callable, tokenizer, device, *,
                 serving: Callable[[Request], tuple[str, str | None]],
                 release: Callable[[set], None] = lambda in_use: None, max_batch: int = 8, max_waiting: int = 32,
                 idle_exit_s: float = 5.0, prefill_tokens: int = PREFILL_TOKENS, threads: int | None = None,
                 context: int | None = None):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be at least 1 and max_waiting at least 0")
        self.model_fn, self.tokenizer, self.device = model_fn, tokenizer, device
        self.serving, self.release = serving, release
        self.max_batch, self.max_waiting, self.idle_exit_s = max_batch, max_waiting, idle_exit_s
        self.prefill_tokens = prefill_tokens  # prompts read together in one forward pass, padded tokens in all
        self.context = context  # the longest a row gets (prompt and reply), where known: the KV storage's cap
        self.threads = threads  # intra-op threads of the engine's thread (None: torch's default; chatbot.cpu)
        self.eos_id = tokenizer.eos_token_id
        self._cache_kwarg = None  # the forward's name for the KV cache, by transformers version
        self._last_only: dict = {}  # logits of the last position only, where the model can
        self._layers_for: tuple = (None, [])  # (adapters loaded, their LoRA layers) for `_lora_layers`
        # (a weak reference to the model, whether it is served packed): `packed.install` once per model
        self._packs: tuple = (lambda: None, False)
        self.step_lock = threading.RLock()  # held for one step; a hot-swap takes it between steps
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._batch: PackedBatch | PaddedBatch | None = None  # the running rows (chatbot.batch)
        self._thread: threading.Thread | None = None
        self._pausers = 0  # callers waiting for the boundary between two steps
        self._admitting = 0  # requests taken from the line, joining the batch in this step
        self.steps = 0  # decode steps run (metrics and tests)
        self.rows_stepped = 0  # rows summed over decode steps: steps x mean batch size
        self.generated = 0  # tokens written

    # -- the line -----------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; raises `Busy` when the batch is full and
        `max_waiting` requests already wait."""
        with self._cv:
            if self.busy():
                raise Busy("the model is busy: too many requests are waiting, try again shortly")
            self._waiting.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return request

    def in_use(self) -> set:
        """The adapter names rows in the batch are being written with."""
        return {r.adapter for r in self._rows if r.adapter}

    @property
    def _rows(self) -> list[Request]:
        """Every row of the batch, shadows included."""
        return self._batch.rows if self._batch is not None else []

    @property
    def running(self) -> int:
        """Replies being written (a shadow is not one: `max_batch` counts
        replies, and the memory plan a shadow's row beside each)."""
        return sum(not r.shadow for r in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def busy(self) -> bool:
        """A new request would find no free row and no place in the line (the
        line counts those about to take a free row too)."""
        return len(self._waiting) + self._admitting + self.running >= self.max_batch + self.max_waiting

    @contextlib.contextmanager
    def between_steps(self):
        """Hold the engine between two decode steps for the length of the
        block (a hot-swap): waits for the step in progress, not for the batch."""
        with self._cv:
            self._pausers += 1
        try:
            with self.step_lock:
                yield
        finally:
            with self._cv:
                self._pausers -= 1
                self._cv.notify_all()

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                idle_since = time.monotonic()
                while not self._waiting and not self._rows:
                    left = self.idle_exit_s - (time.monotonic() - idle_since)
                    if left <= 0:
                        self._thread = None  # a later submit starts a new thread
                        return
                    self._cv.wait(left)
                while self._pausers:  # a hot-swap goes first, at this boundary
                    self._cv.wait()
                admit = []
                while self._waiting and self.running + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
                self._admitting = len(admit)
            with self.step_lock:
                try:
                    self._step(admit)
                except BaseException as exc:  # noqa: BLE001 - every reply in the batch is told
                    for request in [*admit, *self._rows]:
                        if request.finish_reason is None and request.error is None:
                            self._end(request, None, exc)
                    self._batch = None
                finally:
                    self._admitting = 0
                self.release(self.in_use())

    def _step(self, admit: list[Request]) -> None:
        import torch

        with torch.inference_mode():
            joining = []
            for request in admit:
                if request.stop.is_set():
                    self._end(request, "stopped")
                    continue
                request.version, request.adapter = self.serving(request)
                joining.append(request)
                if request.adapter is not None and getattr(request.settings, "within_base", False):
                    joining.append(shadow_of(request))
            if not self._rows:  # an empty batch: the layout for the model serving now
                self._batch = self._layout()
            if joining or self._rows:
                self._batch.step(joining)
                self._batch.drop_finished()

    def _layout(self) -> PackedBatch | PaddedBatch:
        model = self.model_fn()
        if self._packs[0]() is not model:  # the probe runs once per model, not each time the batch empties
            self._packs = (weakref.ref(model), packed.install(model))
        return PackedBatch(self) if self._packs[1] else PaddedBatch(self)

    def _forward(self, rows: list[Request], counts: list[int] | None, layout, **kwargs):
        """The next-token logits of each row of a pass: a padded pass
        (`counts` None, `layout` its `DynamicCache`) or a packed one
        (`counts`: each row's tokens in the pass, `layout`: its
        `chatbot.packed.Pass`). Only the logits needed are computed."""
        import torch

        model = self.model_fn()
        if self._cache_kwarg is None:
            self._cache_kwarg, self._last_only = forward_arguments(model)
        names = [r.adapter or BASE_ROW for r in rows]
        if counts is not None:  # one name per token of a packed pass
            names = [name for name, n in zip(names, counts) for _ in range(n)]
            last = layout.last().to(self.device)
            # An attention mask that is already 4-D: transformers builds none
            # (`chatbot.packed.attention` masks per row itself).
            kwargs.update(packed=layout, use_cache=False,
                          attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device))
            if self._last_only:
                kwargs["logits_to_keep"] = last
        else:
            kwargs.update({self._cache_kwarg: layout, "use_cache": True}, **self._last_only)
        per_row = contextlib.nullcontext()
        # One adapter for every row, and it is the active one: peft's plain
        # path. Else each row (or token) on its own adapter
        # (`chatbot.lora_rows`), or peft's per-row path where that does not
        # apply (a packed pass then goes as one row per token).
        if hasattr(model, "peft_config") and set(names) != {getattr(model, "active_adapter", None)}:
            layers = self._lora_layers(model, names)
            if layers:
                per_row = rows_on_adapters(layers, names, per_token=counts is not None)
            else:
                kwargs["adapter_names"] = names
                if counts is not None:
                    layout.as_rows = True
                    kwargs["input_ids"], kwargs["position_ids"] = (kwargs[k].view(-1, 1) for k in ("input_ids",
                                                                                                   "position_ids"))
                    kwargs.update(self._last_only)
        with per_row:
            logits = model(**kwargs).logits
        if counts is None:
            return logits[:, -1, :].float()
        if layout.as_rows:
            return logits[:, -1, :][last].float()
        return (logits[0] if self._last_only else logits[0, last]).float()

    def _lora_layers(self, model, names: list[str]) -> list:
        """`model`'s LoRA layers when `chatbot.lora_rows` can serve `names`
        (else []); looked up again only when the adapters loaded change."""
        key = (id(model), tuple(model.peft_config), frozenset(names) - {BASE_ROW})
        if self._layers_for[0] != key:
            layers = lora_layers(model)
            self._layers_for = (key, layers if supported(layers, key[2]) else [])
        return self._layers_for[1]

    def _advance(self, rows: list[Request], tokens) -> None:
        now = time.perf_counter()
        for request, token in zip(rows, tokens.tolist()):
            request.tokens.append(token)
            if request.shadow:  # it ends with its reply (`_end`)
                continue
            self.generated += 1
            if request.first_token_at is None:
                request.first_token_at = now
            request.events.put(token)
            if token == self.eos_id:
                self._end(request, "stop")
            elif len(request.tokens) >= int(request.settings.max_new_tokens):
                self._end(request, "length")
            elif request.stop.is_set():
                self._end(request, "stopped")

    def _end(self, request: Request, reason: str | None, error: BaseException | None = None) -> None:
        request.finish_reason, request.error = reason, error
        request.events.put(None)
        if request.twin is not None and not request.shadow:
            request.twin.finish_reason = reason or "stopped"  # its row leaves the batch with the reply's

    # -- sampling --------------------------------------------------------------

    def _sample(self, logits, rows: list[Request]):
        """The next token of each row, drawn with each row's own settings
        (`GenerationSettings.next_token_probs`: greedy below the minimum
        temperature, else temperature then top-p); a reply with a shadow in
        the pass within the base's words (`served_probs`, the shadow's
        logits being the base's), and the shadow takes its reply's token."""
        import torch

        at = {id(r): i for i, r in enumerate(rows)}
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[tuple[int, int | None]]] = {}
        for i, r in enumerate(rows):
            if r.shadow:
                continue
            s = r.settings
            base = at.get(id(r.twin)) if r.twin is not None else None
            key = ((True,) if not s.sampling else (False, float(s.temperature), float(s.top_p))) + (base is not None,)
            groups.setdefault(key, []).append((i, base))
        for key, members in groups.items():
            index = torch.tensor([i for i, _ in members], device=logits.device)
            scores = logits[index]
            settings = rows[members[0][0]].settings
            if key[-1]:
                probs = settings.served_probs(scores, logits[torch.tensor([b for _, b in members],
                                                                          device=logits.device)])
            elif key[0]:
                out[index] = scores.argmax(-1)
                continue
            else:
                probs = settings.next_token_probs(scores)
            out[index] = probs.argmax(-1) if key[0] else torch.multinomial(probs, 1).squeeze(1)
        for i, r in enumerate(rows):
            if r.shadow:
                out[i] = out[at[id(r.twin)]]
        return out


def shadow_of(request: Request) -> Request:
    """`request`'s shadow: a row on the base with the same prompt, stopped
    with it."""
    shadow = Request(list(request.ids), request.settings, request.stop, version=request.version, adapter=None,
                     twin=request, shadow=True)
    request.twin = shadow
    return shadow

