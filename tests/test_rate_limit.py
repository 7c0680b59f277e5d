"""Thumbs faster than a person reads are refused per rater: 429 with
Retry-After on the API, a warning on the page, and nothing stored; another
rater is not held up; the limiter's memory stays bounded."""

import tracemalloc
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest

from chatbot import credentials
from chatbot.policy import GenerationSettings, Policy
from chatbot.rate_limit import DEFAULT_MAX_TRACKED, RateLimit
from chatbot.server import BackgroundServer, create_app
from chatbot.ui import ChatOptions, ChatUI, new_state

from tests.test_identity import basic


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_31st_thumb_in_a_minute_waits_for_the_oldest_to_leave_the_window():
    clock = Clock()
    limit = RateLimit(30, clock=clock)
    for _ in range(30):
        assert limit.take("user:ann") is None
        clock.now += 1.0  # one a second: the first was at 1000, the 30th at 1029
    assert limit.take("user:ann") == pytest.approx(30.0)  # at 1030: the first leaves the window at 1060
    assert limit.take("user:bob") is None  # another rater is not held up
    clock.now = 1059.9
    assert limit.take("user:ann") == pytest.approx(0.1)
    clock.now = 1060.0
    assert limit.take("user:ann") is None  # the refused ones were not counted
    assert limit.take("user:ann") == pytest.approx(1.0)


def test_zero_turns_the_limit_off():
    limit = RateLimit(0)
    assert all(limit.take("user:ann") is None for _ in range(1000))
    assert limit.tracked() == 0


def test_memory_stays_bounded_over_ten_thousand_raters():
    clock = Clock()
    limit = RateLimit(30, clock=clock)
    tracemalloc.start()
    try:
        def fill(raters):
            for n in raters:
                for _ in range(30):  # each rater at the limit: the most a rater can hold
                    limit.take(f"session:address:10.0.{n // 256}.{n % 256}")
            return tracemalloc.get_traced_memory()[0]

        at_cap = fill(range(DEFAULT_MAX_TRACKED))
        after = fill(range(DEFAULT_MAX_TRACKED, 10_000))
    finally:
        tracemalloc.stop()
    assert limit.tracked() == DEFAULT_MAX_TRACKED
    assert after < at_cap * 1.05, (at_cap, after)
    # The rater not heard from for longest was forgotten, the newest is remembered.
    assert limit.take("session:address:10.0.0.0") is None
    assert limit.take("session:address:10.0.39.15") is not None  # rater 9,999


@pytest.fixture
def two_logins(tiny_loaded, store, chat_options):
    creds = credentials.load("ann:ann-password,bob:bob-password")
    with BackgroundServer(create_app(Policy(tiny_loaded), store, chat_options, credentials=creds)) as server:
        with httpx.Client(base_url=server.url, timeout=60, headers=basic("bob", "bob-password")) as client:
            rid = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 3}).json()["id"]
        yield SimpleNamespace(url=server.url, rid=rid)


def test_the_api_refuses_the_31st_thumb_in_a_minute_from_one_login(two_logins, store):
    thumb = {"response_id": two_logins.rid}
    with httpx.Client(base_url=two_logins.url, timeout=60, headers=basic("ann", "ann-password")) as ann:
        for i in range(30):  # claiming other names does not make them other raters
            r = ann.post("/v1/feedback", json={**thumb, "value": 1 if i % 2 else -1, "user": f"name-{i}"})
            assert r.status_code == 200, (i, r.text)
        r = ann.post("/v1/feedback", json={**thumb, "value": 1, "user": "name-30"})
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert store.counts()["feedback"] == 30
    r = httpx.post(two_logins.url + "/v1/feedback", json={**thumb, "value": 1},
                   headers=basic("bob", "bob-password"))
    assert r.status_code == 200, r.text
    assert "chatbot_feedback_refused_total 1.0" in httpx.get(two_logins.url + "/metrics").text
    assert [f["user"] for f in store.feedback_since(0)] == ["ann"] * 30 + ["bob"]


def test_without_logins_the_limit_counts_what_clients_claim(server, store):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        rid = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 3}).json()["id"]
        codes = [client.post("/v1/feedback", json={"response_id": rid, "value": 1, "user": "carol"}).status_code
                 for _ in range(31)]
        assert codes == [200] * 30 + [429]
        assert client.post("/v1/feedback", json={"response_id": rid, "value": 1, "user": "dave"}).status_code == 200
        address = [client.post("/v1/feedback", json={"response_id": rid, "value": 1}).status_code for _ in range(31)]
        assert address == [200] * 30 + [429]  # no claim: the address is the rater
    assert store.counts()["feedback"] == 61


def test_the_limit_is_a_setting_and_zero_turns_it_off(tiny_loaded, store):
    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=3), max_thumbs_per_minute=0)
    with BackgroundServer(create_app(Policy(tiny_loaded), store, options)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            hi = {"messages": [{"role": "user", "content": "Hi"}]}
            rid = client.post("/v1/chat/completions", json=hi).json()["id"]
            assert all(client.post("/v1/feedback", json={"response_id": rid, "value": 1}).status_code == 200
                       for _ in range(40))
    assert store.counts()["feedback"] == 40
    with pytest.raises(ValueError, match="max-thumbs-per-minute"):
        ChatOptions(defaults=GenerationSettings(), max_thumbs_per_minute=-1).validate()


def test_the_page_warns_and_stores_nothing_over_the_limit(tiny_loaded, store):
    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=4), max_thumbs_per_minute=3)
    ui = ChatUI(Policy(tiny_loaded), store, options)
    ann = SimpleNamespace(session_hash="tab-1", username="ann")
    state = list(ui.respond("Hello", new_state(), 4, 1.0, "", ann))[-1][2]

    def like(liked, req, session=None):
        return ui.like(gr.LikeData(None, {"index": 1, "value": "", "liked": liked}),
                       {**state, "session_id": session or state["session_id"]}, req)

    for liked in (True, False, True):
        _, shown = like(liked, ann)
        assert shown == gr.update()
    with pytest.warns(UserWarning, match="not saved"):
        _, shown = like(False, ann)
    assert shown["feedback_value"] == ["Like"]  # the thumbs shown go back to the stored vote
    with pytest.warns(UserWarning, match="not saved"):  # a comment is feedback too
        box, _ = ui.comment("better", state, SimpleNamespace(session_hash="tab-2", username="ann"))
    assert box["value"] == "better"
    assert [(f["user"], f["value"]) for f in store.feedback_since(0)] == [("ann", 1), ("ann", -1), ("ann", 1)]
    like(False, SimpleNamespace(session_hash="tab-3", username=None), session="web-tab-3")  # someone else
    assert [(f["user"], f["session_id"]) for f in store.feedback_since(0)][-1] == (None, "web-tab-3")
