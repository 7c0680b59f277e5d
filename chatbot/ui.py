"""The chat page: Gradio Blocks with streaming replies, thumbs, comments and
regenerate, every reply and thumb recorded through the `Store`.

Per-user data lives in `gr.State` (the working conversation) and
`gr.BrowserState` (the browser's session id and a snapshot of the
conversation, so that a reload shows it again with the votes already given;
encrypted with a key that outlives a restart, `chatbot.browser_secret`).
Handlers are plain functions of the `ChatUI` object; the wiring is at the end,
one line per event. The rater of every reply and thumb is the Gradio login
when the page asks for one, else the browser session (`chatbot.identity`);
thumbs faster than the shared `RateLimit` allows get a warning and are not stored.
"""

import html
import re
import threading
import uuid
from dataclasses import dataclass, replace

import gradio as gr

from chatbot.credentials import Verified
from chatbot.identity import Identity, identify
from chatbot.limits import Limits, TooLarge
from chatbot.policy import Busy, GenerationSettings, Policy, PromptError, Route
from chatbot.rate_limit import DEFAULT_PER_MINUTE, RateLimit, retry_after
from storage import Store, StoreError

VALUE_OF = {True: 1, False: -1}
# The page at any width: the message box grows with the window, the buttons
# beside it keep their size, and on a phone nothing overflows sideways.
PAGE_CSS = """
#composer, #comment-row { flex-wrap: nowrap; gap: 8px; align-items: stretch; }
#composer > *:first-child, #comment-row > *:first-child { min-width: 0; flex-grow: 1; }
#top { align-items: center; flex-wrap: nowrap; }
#new-chat { align-self: center; flex-grow: 0; }
#intro p { margin: 0; }
"""
FEEDBACK_LABEL = {1: "Like", -1: "Dislike"}


@dataclass
class ChatOptions:
    """The operator's defaults and limits for the chat page and the API."""

    defaults: GenerationSettings
    max_message_chars: int = 8000  # one message or system prompt; longer ones are refused
    max_new_tokens_limit: int = 1024  # the most a user (or API client) may ask for
    max_messages: int = 64  # in one request; the page sends the newest turns within these two
    max_total_chars: int = 32000
    max_thumbs_per_minute: int = DEFAULT_PER_MINUTE  # from one rater, page and API together; 0: no limit

    def validate(self) -> "ChatOptions":
        self.defaults.validate()
        self.limits.validate()
        if not isinstance(self.max_thumbs_per_minute, int) or self.max_thumbs_per_minute < 0:
            raise ValueError("--max-thumbs-per-minute must be a whole number of at least 0 (0: no limit)")
        if len(self.defaults.system_prompt) > self.max_message_chars:
            raise ValueError(f"--system-prompt is {len(self.defaults.system_prompt):,} characters, over "
                             f"--max-message-chars {self.max_message_chars:,}")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(max_message_chars=self.max_message_chars, max_messages=self.max_messages,
                      max_total_chars=self.max_total_chars)


def new_state() -> dict:
    return {"session_id": None, "conversation_id": None, "turns": []}


# A "]" that opens a link's address or reference: "[text](url)", "![alt](src)",
# "[text][ref]", "[ref]: url". An invisible space after it leaves the text as
# written and no link.
_LINK_SYNTAX = re.compile(r"\](?=[(\[:])")


def render(text: str, version: str | None = None, *, corrected: bool = False) -> str:
    """What the chat shows: the text escaped (HTML in it is shown, never run),
    markdown links and images shown as written, address included, never as a
    link whose address is hidden (a reply can be steered into one), and for a
    bot reply a small label naming the version that wrote it (or saying the
    person corrected it)."""
    shown = _LINK_SYNTAX.sub("]\u200b", html.escape(text, quote=False))
    if version:
        label = f"your correction of model {version}" if corrected else f"model {version}"
        shown += f"\n\n<sub>{html.escape(label)}</sub>"
    return shown


def unrender(shown: str) -> str:
    """The text a person typed into a message shown by `render` (an edit):
    the label cut off, the escaping undone."""
    text = re.sub(r"\n\n<sub>[^<]*</sub>\s*$", "", shown or "")
    return html.unescape(text).replace("]\u200b", "]").strip()


def display(state: dict, pending_reply: str | None = None) -> list[dict]:
    """The chat component's value, derived from the state's turns."""
    out = []
    for turn in state["turns"]:
        out.append({"role": "user", "content": render(turn["user"])})
        if turn["replies"]:
            reply = turn["replies"][turn["shown"]]
            out.append({"role": "assistant", "content": render(reply.get("correction") or reply["text"],
                                                               reply["version"],
                                                               corrected="correction" in reply)})
    if pending_reply is not None:
        out.append({"role": "assistant", "content": render(pending_reply) or "…"})
    return out


def route_of(state: dict) -> Route:
    """A conversation stays on the version its first reply came from (the
    canary's arm or the serving one); a new one draws its arm."""
    first = next((reply for turn in state["turns"] for reply in turn["replies"]), None)
    return Route(pinned=first["version"]) if first else Route()


def messages_for(turns: list[dict]) -> list[dict]:
    """The conversation as the model sees it: each turn's shown reply (as the
    person corrected it, if they did)."""
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["user"]})
        if turn["replies"]:
            reply = turn["replies"][turn["shown"]]
            messages.append({"role": "assistant", "content": reply.get("correction") or reply["text"]})
    return messages


class ChatUI:
    def __init__(self, policy: Policy, store: Store, options: ChatOptions, *, browser_secret: str | None = None,
                 thumbs: RateLimit | None = None):
        self.policy = policy
        self.store = store
        self.options = options
        # Shared with the API (`chatbot.server`), so a rater's thumbs count together.
        self.thumbs = thumbs or RateLimit(options.max_thumbs_per_minute)
        # The key of the conversations saved in the browser (chatbot.browser_secret);
        # without one, Gradio makes one for this process only.
        self.browser_secret = browser_secret
        # Stop buttons: one event per browser session that is generating.
        self._stops: dict[str, threading.Event] = {}
        self._stops_lock = threading.Lock()

    # -- who is chatting --------------------------------------------------------

    @staticmethod
    def session_id(state: dict, request: gr.Request | None) -> str:
        """The browser session's id: made on first use, kept in the state (and the browser) across reloads."""
        if not state.get("session_id"):
            hash_ = getattr(request, "session_hash", None) if request is not None else None
            state["session_id"] = f"web-{hash_ or uuid.uuid4().hex}"
        return state["session_id"]

    def identity(self, state: dict, request: gr.Request | None) -> Identity:
        """The rater: the Gradio login (the page asks for one with --auth), else the browser session."""
        login = getattr(request, "username", None) if request is not None else None
        return identify(verified=Verified(login, "login") if login else None,
                        browser_session=self.session_id(state, request))

    # -- handlers -----------------------------------------------------------------

    def restore(self, saved: dict | None, request: gr.Request):
        """On page load: the same session id, and the conversation with its votes."""
        state = new_state()
        if saved and saved.get("session_id"):
            state.update({k: saved.get(k, state[k]) for k in state})
        votes = self._feedback_value(state, self.identity(state, request))
        shown = gr.update(value=display(state), feedback_value=votes)
        return shown, state

    def respond(self, message: str, state: dict, max_new_tokens, temperature, system_prompt,
                request: gr.Request):
        """Add the user's message and stream the reply."""
        message = (message or "").strip()
        if not message:  # an empty message is ignored
            yield gr.update(), gr.update(), state
            return
        problem = self._too_long(message, "Your message") or self._too_long(system_prompt, "The system prompt")
        if problem:
            gr.Warning(problem)
            yield gr.update(value=message), gr.update(), state
            return
        turns = state["turns"] + [{"user": message, "replies": [], "shown": 0}]
        state = {**state, "turns": turns}
        yield from self._generate(state, len(turns) - 1, max_new_tokens, temperature, system_prompt, request)

    def regenerate(self, retry: gr.RetryData, state: dict, max_new_tokens, temperature, system_prompt,
                   request: gr.Request):
        """Another reply to the same turn; the earlier ones stay stored as alternatives."""
        turn_index = min(retry.index // 2, len(state["turns"]) - 1)
        problem = self._too_long(system_prompt, "The system prompt")
        if turn_index < 0 or problem:
            if problem:
                gr.Warning(problem)
            yield gr.update(), gr.update(), state
            return
        state = {**state, "turns": state["turns"][: turn_index + 1]}
        yield from self._generate(state, turn_index, max_new_tokens, temperature, system_prompt, request)

    def _generate(self, state, turn_index, max_new_tokens, temperature, system_prompt, request):
        rater, session_id = self.identity(state, request), self.session_id(state, request)
        try:
            settings = replace(
                self.options.defaults,
                max_new_tokens=int(min(max_new_tokens, self.options.max_new_tokens_limit)),
                temperature=float(temperature),
                system_prompt=(system_prompt or "").strip(),
            ).validate()
        except (TypeError, ValueError) as exc:
            raise gr.Error(f"Invalid generation settings: {exc}") from None
        turn = state["turns"][turn_index]
        prompt = messages_for(state["turns"][:turn_index]) + [{"role": "user", "content": turn["user"]}]
        if settings.system_prompt:
            prompt = [{"role": "system", "content": settings.system_prompt}] + prompt
        try:  # a long chat sends its newest turns
            prompt, _ = self.options.limits.newest_within(prompt)
        except TooLarge as exc:
            raise gr.Error(exc.message) from None

        stop = threading.Event()
        with self._stops_lock:
            self._stops[session_id] = stop
        text = ""
        try:
            yield "", display(state, pending_reply=""), state
            stream = self.policy.stream(prompt, settings, stop=stop, route=route_of(state))
            for piece in stream:
                text += piece
                yield "", display(state, pending_reply=text), state
        except (Busy, PromptError) as exc:
            raise gr.Error(str(exc)) from None
        finally:
            with self._stops_lock:
                if self._stops.get(session_id) is stop:
                    del self._stops[session_id]

        result = stream.result
        if state["conversation_id"] is None:
            state = {**state, "conversation_id": self.store.start_conversation(rater.session_id, rater.user)}
        response_id = self.store.log_response(
            conversation_id=state["conversation_id"],
            prompt=prompt,
            reply=result.text,
            model_version=result.version,
            generation=settings.as_dict(),
            latency_ms=result.latency_ms,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            **rater.columns(),
        )
        turn = {**turn, "replies": turn["replies"] + [{"id": response_id, "text": result.text,
                                                       "version": result.version}]}
        turn["shown"] = len(turn["replies"]) - 1
        turns = state["turns"][:turn_index] + [turn]
        state = {**state, "turns": turns}
        yield "", gr.update(value=display(state), feedback_value=self._feedback_value(state, rater)), state

    def stop(self, state: dict, request: gr.Request):
        with self._stops_lock:
            stop = self._stops.get(self.session_id(state, request))
        if stop is not None:
            stop.set()

    def like(self, data: gr.LikeData, state: dict, request: gr.Request):
        """A thumb on a bot reply; clicking again or switching is a new row.
        One over the rate limit is not stored, and the thumbs shown go back
        to the votes that are."""
        response_id = self._response_at(state, data.index)
        if response_id is None:
            return state, gr.update()
        rater = self.identity(state, request)
        if not self._take_thumb(rater):
            return state, gr.update(feedback_value=self._feedback_value(state, rater))
        value = VALUE_OF.get(data.liked, 0)  # "" or None: the vote was taken back
        self.store.record_feedback(response_id, value, **rater.columns())
        return {**state, "last_rated": response_id}, gr.update()

    def comment(self, text: str, state: dict, request: gr.Request):
        """A short note on the reply last rated (else the latest reply)."""
        text = (text or "").strip()
        if not text:
            return gr.update(), state
        if len(text) > self.options.max_message_chars:
            gr.Warning(f"Comments are limited to {self.options.max_message_chars:,} characters.")
            return gr.update(value=text), state
        response_id = state.get("last_rated") or self._response_at(state, None)
        if response_id is None:
            gr.Warning("There is no reply to comment on yet.")
            return gr.update(value=text), state
        rater = self.identity(state, request)
        if not self._take_thumb(rater):
            return gr.update(value=text), state
        current = self.store.votes_for([response_id], session_id=rater.session_id, user=rater.user)
        try:
            self.store.record_feedback(response_id, current.get(response_id, 0), comment=text, **rater.columns())
        except StoreError as exc:
            raise gr.Error(str(exc)) from None
        gr.Info("Thanks, your comment was saved.")
        return "", state

    def correct(self, data: gr.EditData, state: dict, request: gr.Request):
        """A bot reply the person edited: the text they wrote is stored as its
        correction (a thumbs-down that carries the better reply), shown in its
        place, and the conversation goes on from it."""
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        rater = self.identity(state, request)
        unchanged = gr.update(value=display(state), feedback_value=self._feedback_value(state, rater))
        if index % 2 == 0:  # a message of the person's own
            gr.Info("Only the bot's replies can be corrected; send a new message instead.")
            return unchanged, state
        response_id = self._response_at(state, index)
        value = data.value if isinstance(data.value, str) else (data.value or {}).get("text", "")
        text = unrender(value)
        turn = state["turns"][index // 2] if response_id else None
        shown = turn["replies"][turn["shown"]] if turn else None
        if shown is None or not text or text == (shown.get("correction") or shown["text"]):
            return unchanged, state
        if problem := self._too_long(text, "A correction"):
            gr.Warning(problem)
            return unchanged, state
        if not self._take_thumb(rater):
            return unchanged, state
        try:
            self.store.record_feedback(response_id, -1, correction=text, **rater.columns())
        except StoreError as exc:
            raise gr.Error(str(exc)) from None
        replies = list(turn["replies"])
        replies[turn["shown"]] = {**shown, "correction": text}
        turns = list(state["turns"])
        turns[index // 2] = {**turn, "replies": replies}
        state = {**state, "turns": turns, "last_rated": response_id}
        gr.Info("Thanks: the bot learns from your correction.")
        return gr.update(value=display(state), feedback_value=self._feedback_value(state, rater)), state

    def new_chat(self, state: dict, request: gr.Request):
        fresh = {**new_state(), "session_id": self.session_id(state, request)}
        return [], fresh

    # -- helpers ----------------------------------------------------------------

    def _too_long(self, text: str | None, what: str) -> str | None:
        """Why `text` (a message, a system prompt) cannot be sent, if it cannot."""
        limit = self.options.max_message_chars
        chars = len((text or "").strip())
        if chars <= limit:
            return None
        return f"{what} is {chars:,} characters; the limit is {limit:,}. Please shorten it."

    @staticmethod
    def _response_at(state: dict, index) -> str | None:
        """The response id behind a bot message index (None: the latest reply)."""
        turns = state["turns"]
        if index is None:
            turn_index = len(turns) - 1
        else:
            index = index[0] if isinstance(index, (list, tuple)) else index
            turn_index = index // 2
        if not 0 <= turn_index < len(turns) or not turns[turn_index]["replies"]:
            return None
        turn = turns[turn_index]
        return turn["replies"][turn["shown"]]["id"]

    def _take_thumb(self, rater: Identity) -> bool:
        """Whether the rate limit lets this thumb (or comment) be stored; a warning when not."""
        wait = self.thumbs.take(rater.key)
        if wait is not None:
            gr.Warning(f"That was more than {self.thumbs.per_minute} ratings in a minute, so it was not saved. "
                       f"Please try again in {retry_after(wait)} seconds.")
        return wait is None

    def _feedback_value(self, state: dict, rater: Identity) -> list:
        ids = [t["replies"][t["shown"]]["id"] for t in state["turns"] if t["replies"]]
        votes = self.store.votes_for(ids, session_id=rater.session_id, user=rater.user) if ids else {}
        return [FEEDBACK_LABEL.get(votes.get(rid)) for rid in ids]

    # -- the page -------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        """The page: the conversation across the width, the message box under
        it with Send (Stop while a reply is being written) beside it; a
        comment box that opens under the chat once a reply is rated; New chat
        at the top; the generation settings in a sidebar, closed."""
        d = self.options.defaults
        with gr.Blocks(title="Learning chatbot", analytics_enabled=False, css=PAGE_CSS) as demo:
            saved = gr.BrowserState(new_state(), storage_key="learning-chatbot", secret=self.browser_secret)
            state = gr.State(new_state())
            with gr.Row(elem_id="top"):
                gr.Markdown("**Learning chatbot**: rate replies with a thumb, or edit one into what it should "
                            "have said. The bot learns from both.", elem_id="intro")
                clear = gr.Button("New chat", size="sm", variant="secondary", scale=0, min_width=96,
                                  elem_id="new-chat")
            chat = gr.Chatbot(
                show_label=False, height="62vh", feedback_options=("Like", "Dislike"),
                sanitize_html=True, elem_id="chat", editable="all",
            )
            with gr.Row(visible=False, elem_id="comment-row") as comment_row:
                note = gr.Textbox(placeholder="A comment on the reply you rated (optional)", show_label=False,
                                  container=False, scale=8, elem_id="comment")
                note_send = gr.Button("Send comment", size="sm", scale=0, min_width=120, elem_id="send-comment")
            with gr.Row(equal_height=True, elem_id="composer"):
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, container=False,
                                 scale=8, elem_id="message", max_lines=8, autofocus=True)
                send = gr.Button("Send", variant="primary", scale=0, min_width=96, elem_id="send")
                stop = gr.Button("Stop", variant="stop", scale=0, min_width=96, elem_id="stop", visible=False)
            with gr.Sidebar(label="Generation settings", open=False, position="right"):
                max_new = gr.Slider(1, self.options.max_new_tokens_limit, value=d.max_new_tokens, step=1,
                                    label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature (0: greedy)")
                system = gr.Textbox(value=d.system_prompt, label="System prompt", lines=2)

            settings = [max_new, temperature, system]
            # As many replies run at once as the serving batch holds rows: the
            # page's people share the batch with the API's clients.
            model = dict(concurrency_id="model", concurrency_limit=self.policy.max_batch)
            writing = dict(fn=lambda: (gr.update(visible=False), gr.update(visible=True)), inputs=None,
                           outputs=[send, stop], queue=False, api_name=False, show_progress="hidden")
            done = {**writing, "fn": lambda: (gr.update(visible=True), gr.update(visible=False))}
            demo.load(self.restore, [saved], [chat, state], queue=False, api_name=False)
            box.submit(**writing).then(self.respond, [box, state, *settings], [box, chat, state], **model,
                                       api_name="chat").then(**done)
            send.click(**writing).then(self.respond, [box, state, *settings], [box, chat, state], **model,
                                       api_name=False).then(**done)
            chat.retry(**writing).then(self.regenerate, [state, *settings], [box, chat, state], **model,
                                       api_name="regenerate").then(**done)
            chat.like(self.like, [state], [state, chat], api_name="like").then(
                lambda: gr.update(visible=True), None, comment_row, queue=False, api_name=False,
                show_progress="hidden")
            chat.edit(self.correct, [state], [chat, state], api_name="correct")
            stop.click(self.stop, [state], None, queue=False, api_name="stop")
            clear.click(self.new_chat, [state], [chat, state], api_name="new_chat").then(
                lambda: gr.update(visible=False), None, comment_row, queue=False, api_name=False,
                show_progress="hidden")
            note.submit(self.comment, [note, state], [note, state], api_name=False)
            note_send.click(self.comment, [note, state], [note, state], api_name="comment")
            state.change(lambda s: s, [state], [saved], queue=False, api_name=False, show_progress="hidden")
        return demo
