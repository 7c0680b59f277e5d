"""Requests are bounded before they reach the model: every size limit is one
status (413, code request_too_large), refused at once, without the model;
prompts are tokenized outside the generation lock; a history longer than the
context keeps its newest turns and the answer says how many were left out."""

import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from chatbot.limits import Limits, TooLarge
from chatbot.policy import GenerationSettings, Policy

HELLO = [{"role": "user", "content": "Hello"}]


def conversation(n: int, chars: int) -> list[dict]:
    """n messages of `chars` characters each, alternating, ending on the user's."""
    return [{"role": "user" if (n - 1 - i) % 2 == 0 else "assistant",
             "content": (f"{i} " + "hello there " * chars)[:chars]} for i in range(n)]


@pytest.fixture
def served(tiny_loaded, store):
    """The app with the default limits (64 messages, 8,000 characters each,
    32,000 in all), and its policy."""
    from chatbot.server import BackgroundServer, create_app
    from chatbot.ui import ChatOptions

    policy = Policy(tiny_loaded)
    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=8), max_new_tokens_limit=64)
    with BackgroundServer(create_app(policy, store, options)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield SimpleNamespace(client=client, policy=policy, options=options)


def assert_too_large(r, param=None):
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("stream", [False, True])
def test_an_oversized_request_is_refused_at_once_while_the_model_is_busy(served, store, stream):
    huge = conversation(200, 8000)
    with served.policy.engine.between_steps():  # the model is held
        started = time.perf_counter()
        r = served.client.post("/v1/chat/completions", json={"messages": huge, "stream": stream})
        elapsed = time.perf_counter() - started
    assert_too_large(r)
    assert elapsed < 2.0, elapsed
    assert store.counts()["responses"] == 0


SIZE_LIMITS = [
    ("too many messages", {"messages": conversation(65, 10)}, "messages", "65 messages"),
    ("too many characters in all", {"messages": conversation(5, 7000)}, "messages", "35,000 characters"),
    ("one message too long", {"messages": [{"role": "user", "content": "x" * 8001}]}, "messages.0.content",
     "8,001 characters"),
    ("system prompt too long", {"messages": [{"role": "system", "content": "x" * 8001}, *HELLO]},
     "messages.0.content", "system prompt"),
    ("developer prompt too long", {"messages": [{"role": "developer", "content": "x" * 9000}, *HELLO]},
     "messages.0.content", "system prompt"),
    ("text parts too long", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 5000}] * 2}]},
     "messages.0.content", "10,000 characters"),
    ("user name too long", {"messages": HELLO, "user": "u" * 201}, "user", "user"),
    ("body over the byte limit", {"messages": HELLO, "padding": "p" * 1_100_000}, None, "1,048,576 bytes"),
]


@pytest.mark.parametrize("name,payload,param,needle", SIZE_LIMITS, ids=[s[0] for s in SIZE_LIMITS])
def test_every_size_limit_is_one_status(served, store, name, payload, param, needle):
    error = assert_too_large(served.client.post("/v1/chat/completions", json=payload), param)
    assert needle in error["message"]
    assert store.counts()["responses"] == 0


def test_a_body_without_a_length_is_cut_off_at_the_limit(served):
    sent = []

    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            sent.append(1)
            yield b"x" * 65536
        yield b'"}]}'

    r = served.client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert "over the limit" in assert_too_large(r)["message"]


def test_a_long_feedback_comment_is_the_same_status(served, store):
    rid = served.client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["id"]
    r = served.client.post("/v1/feedback", json={"response_id": rid, "value": 1, "comment": "c" * 8001})
    assert_too_large(r, "comment")
    assert store.feedback_since(0) == []


def test_a_request_within_the_limits_is_served(served):
    r = served.client.post("/v1/chat/completions", json={"messages": conversation(64, 500), "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_limits_are_checked_when_the_server_starts():
    assert Limits().validate() == Limits(8000, 64, 32000)
    with pytest.raises(ValueError, match="--max-messages"):
        Limits(max_messages=0).validate()
    with pytest.raises(ValueError, match="--max-total-chars must be at least --max-message-chars"):
        Limits(max_message_chars=9000, max_total_chars=8000).validate()


def test_serve_takes_the_limits_as_flags_and_refuses_nonsense():
    import app

    parse = app.build_parser().parse_args
    args = parse(["serve"])
    assert (args.max_message_chars, args.max_messages, args.max_total_chars) == (8000, 64, 32000)
    settings, options = app.serve_settings(parse(["serve", "--max-batch", "3", "--max-waiting", "5"]))
    assert (settings.max_batch, settings.max_waiting, options.max_messages) == (3, 5, 64)
    for flags, message in [
        (["--max-messages", "10", "--max-total-chars", "5000", "--max-message-chars", "6000"],
         "--max-total-chars must be at least --max-message-chars"),
        (["--max-message-chars", "100", "--system-prompt", "s" * 101], "--system-prompt is 101 characters"),
        (["--max-thumbs-per-minute", "-1"], "--max-thumbs-per-minute must be a whole number of at least 0"),
        (["--max-batch", "0"], "--max-batch must be between 1 and 4096"),
        (["--max-waiting", "-1"], "--max-waiting must be at least 0"),
        (["--temperature", "3"], "temperature must be between 0 and 2"),
    ]:
        with pytest.raises(app.CliError, match=message) as refused:
            app.serve_settings(parse(["serve", *flags]))
        assert refused.value.code == 2


# -- the prompt: tokenized before it joins the batch, the newest turns kept ---------------


def recording_encodes(policy, monkeypatch) -> list[bool]:
    """For each tokenization of a prompt, whether it ran inside a model step:
    on the engine's thread, or with its step lock held by the tokenizing thread."""
    inside, encode, lock = [], policy._encode, policy.engine.step_lock

    def spy(messages):
        inside.append(threading.current_thread().name == "engine" or lock._is_owned())
        return encode(messages)

    monkeypatch.setattr(policy, "_encode", spy)
    return inside


def test_prompts_are_tokenized_before_the_model_is_locked(tiny_loaded, monkeypatch):
    policy = Policy(tiny_loaded)
    inside = recording_encodes(policy, monkeypatch)
    settings = GenerationSettings(max_new_tokens=3)
    policy.generate(conversation(21, 400), settings)
    list(policy.stream(conversation(21, 400), settings))
    assert inside and not any(inside)


def test_a_prompt_is_tokenized_while_another_request_generates(tiny_loaded, monkeypatch):
    policy = Policy(tiny_loaded)
    encoded = recording_encodes(policy, monkeypatch)
    replies = []
    with policy.engine.between_steps():  # the model is held
        waiting = threading.Thread(target=lambda: replies.append(
            policy.generate(conversation(21, 400), GenerationSettings(max_new_tokens=3))), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 10
        while not encoded and time.monotonic() < deadline:
            time.sleep(0.01)
        assert encoded and not any(encoded), "the prompt waited for the model before it was tokenized"
        assert waiting.is_alive() and not replies  # the reply itself waits for the model
    waiting.join(30)
    assert replies and replies[0].truncated_messages > 0


def test_a_history_longer_than_the_context_keeps_its_newest_turns_and_the_system_prompt(tiny_loaded):
    policy = Policy(tiny_loaded)
    settings = GenerationSettings(max_new_tokens=12)
    chat = [{"role": "system", "content": "Be brief."}, *conversation(21, 400)]
    prompt = policy.build_prompt(chat, settings)
    budget = policy.max_context - 12
    kept = prompt.messages[1:]
    assert prompt.messages[0] == chat[0] and kept == chat[len(chat) - len(kept):]
    assert kept[0]["role"] == "user" and 0 < prompt.dropped == 21 - len(kept)
    assert prompt.ids == policy._encode(prompt.messages) and len(prompt.ids) <= budget
    # the longest such tail that fits: one more exchange would not
    assert len(policy._encode([chat[0], *chat[len(chat) - len(kept) - 2:]])) > budget


def test_a_system_message_from_the_client_reaches_the_model(tiny_loaded):
    policy = Policy(tiny_loaded)
    sent = policy.build_prompt([{"role": "system", "content": "Be brief."}, *HELLO], GenerationSettings()).messages
    assert sent == [{"role": "system", "content": "Be brief."}, *HELLO]
    with_default = policy.build_prompt(HELLO, GenerationSettings(system_prompt="Be kind.")).messages
    assert with_default == [{"role": "system", "content": "Be kind."}, *HELLO]


def test_truncation_is_reported_streamed_or_not(served, store):
    long_chat = conversation(21, 400)
    r = served.client.post("/v1/chat/completions", json={"messages": long_chat, "max_tokens": 3})
    assert r.status_code == 200, r.text
    dropped = r.json()["usage"]["truncated_messages"]
    assert dropped > 0 and r.headers["X-Truncated-Messages"] == str(dropped)
    with served.client.stream("POST", "/v1/chat/completions",
                              json={"messages": long_chat, "max_tokens": 3, "stream": True}) as s:
        assert s.headers["X-Truncated-Messages"] == str(dropped)
        assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    r = served.client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert r.headers["X-Truncated-Messages"] == "0" and r.json()["usage"]["truncated_messages"] == 0


# -- the chat page ------------------------------------------------------------------


@pytest.fixture
def ui(tiny_loaded, store):
    from chatbot.ui import ChatOptions, ChatUI

    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=4), max_message_chars=300, max_messages=4,
                          max_total_chars=1000, max_new_tokens_limit=16)
    return ChatUI(Policy(tiny_loaded), store, options)


def request():
    return SimpleNamespace(session_hash="browser-1", username=None)


def say(ui, text, state, system=""):
    return list(ui.respond(text, state, 4, 1.0, system, request()))


def test_the_page_refuses_a_system_prompt_over_the_limit(ui, store):
    from chatbot.ui import new_state

    for system in ("s" * 301, "s" * 5_000_000):
        started = time.perf_counter()
        with pytest.warns(UserWarning, match="The system prompt is .* the limit is 300"):
            outputs = say(ui, "Hello", new_state(), system=system)
        assert time.perf_counter() - started < 2.0
        assert outputs[-1][0]["value"] == "Hello" and outputs[-1][2]["turns"] == []
    state = say(ui, "Hello", new_state())[-1][2]
    import gradio as gr

    retry = gr.RetryData(None, {"index": 0, "value": "Hello"})
    with pytest.warns(UserWarning, match="The system prompt"):
        outputs = list(ui.regenerate(retry, state, 4, 1.0, "s" * 301, request()))
    assert outputs[-1][2] == state
    assert store.counts()["responses"] == 1


def test_a_long_chat_on_the_page_sends_its_newest_turns_within_the_limits(ui, store):
    from chatbot.ui import new_state

    state = new_state()
    for text in ("first", "second", "third " * 40):
        state = say(ui, text, state, system="Be brief.")[-1][2]
    last = store.get_response(state["turns"][-1]["replies"][0]["id"])["prompt"]
    assert last[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in last[1:]] == ["user", "assistant", "user"] and last[1]["content"] == "second"
    assert sum(len(m["content"]) for m in last) <= 1000


def test_newest_within_keeps_the_system_prompt_and_starts_on_a_user_turn():
    limits = Limits(max_message_chars=100, max_messages=4, max_total_chars=250)
    chat = [{"role": "system", "content": "s" * 50}, *conversation(7, 60)]
    kept, dropped = limits.newest_within(chat)
    assert kept == [chat[0], *chat[-3:]] and dropped == 4
    with pytest.raises(TooLarge):
        Limits(max_message_chars=100, max_messages=4, max_total_chars=120).newest_within(
            [{"role": "system", "content": "s" * 100}, {"role": "user", "content": "u" * 30}])


def test_messages_the_chat_template_refuses_are_a_400(tiny_loaded, store, chat_options):
    """Some models' templates insist that roles alternate: that is the
    client's to fix, answered as such, not a 500."""
    import copy

    from chatbot.models import LoadedModel
    from chatbot.server import BackgroundServer, create_app

    tokenizer = copy.deepcopy(tiny_loaded.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    loaded = LoadedModel(tiny_loaded.model, tokenizer, tiny_loaded.name, tiny_loaded.path, tiny_loaded.device,
                         tiny_loaded.dtype)
    twice = [{"role": "user", "content": "Hi"}, *HELLO]
    with BackgroundServer(create_app(Policy(loaded), store, chat_options)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={"messages": twice, "stream": stream})
            assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"], r.text
        assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200
    assert store.counts()["responses"] == 1
