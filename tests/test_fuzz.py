"""The HTTP API fuzzed from its own OpenAPI schema (`tests/api_fuzz.py`):
the chat, the thumbs, the models list and the operator routes, each with
positive and negative cases from a fixed seed, then every method a path does
not take. No answer may be a 5xx, and every error under /v1 has OpenAI's
shape. The fuzz itself is checked: a route that fails is found."""

from __future__ import annotations

import httpx
import pytest

from chatbot.admin import Operations
from chatbot.policy import Policy
from chatbot.server import BackgroundServer, create_app
from chatbot.swap import VersionFollower
from tests.api_fuzz import fuzz_api

TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "Hello"}]
EXAMPLES = 100  # per operation and mode: about 30 s on a 2-core CPU


def _served(tiny_loaded, store, chat_options, data_dir):
    """The whole app with its operator routes on; its scheduler is the real
    one, with a training process that exits at once."""
    from online_rl.scheduler import RetrainScheduler, ScheduleConfig

    policy = Policy(tiny_loaded)
    scheduler = RetrainScheduler(store, lambda method, threads: ["true"], ScheduleConfig(every_s=0),
                                 log_dir=data_dir / "logs")
    ops = Operations(store, VersionFollower(policy, store), scheduler)
    return BackgroundServer(create_app(policy, store, chat_options, ops=ops, admin_token=TOKEN))


def _first_reply(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_no_fuzzed_request_gets_a_5xx(tiny_loaded, tiny_model_dir, store, chat_options, data_dir):
    from conftest import make_adapter

    # A registry to promote and roll back through: v1 loads, v2's weights are gone.
    for seed, version in ((1, "v1"), (2, "v2")):
        path = make_adapter(tiny_model_dir, data_dir / "adapters" / version, seed, str(tiny_model_dir))
        store.register_adapter(version, path=str(path), base_model=str(tiny_model_dir))
    (data_dir / "adapters" / "v2" / "adapter_model.safetensors").unlink()
    with _served(tiny_loaded, store, chat_options, data_dir) as server:
        report = fuzz_api(server.url, examples=EXAMPLES, headers=AUTH, response_id=_first_reply(server.url),
                          max_tokens=chat_options.max_new_tokens_limit, versions=["v1", "v2", "v0"])
    assert not report.findings, f"{len(report.findings)} bad answers:\n" + "\n".join(map(str, report.findings[:8]))
    # The steered cases went past validation: replies, thumbs, a swap and a refusal.
    by = report.by_operation
    assert by["POST /v1/chat/completions (positive)"].get(200, 0) >= EXAMPLES // 4, by
    assert by["POST /v1/feedback (positive)"].get(200, 0) >= EXAMPLES // 4, by
    assert by["POST /v1/admin/promote (positive)"].get(200) and by["POST /v1/admin/promote (positive)"].get(409), by
    assert report.cases["other methods"] >= 30 and by["other methods"] == {405: report.cases["other methods"]}
    assert all(report.cases[f"POST /v1/{path} ({mode})"] == EXAMPLES
               for path in ("chat/completions", "feedback") for mode in ("positive", "negative"))
    assert store.counts()["feedback"] >= EXAMPLES // 4


def test_the_fuzz_finds_a_route_that_fails(tiny_loaded, store, chat_options, data_dir, monkeypatch):
    """A thumbs-down that raises in the store, and a streamed reply whose
    generation fails half-way, are both found; the 500 is in OpenAI's shape."""
    from chatbot.streaming import Pieces

    record = store.record_feedback

    def broken_record(response_id, value, **kwargs):
        if value == -1:
            raise RuntimeError("the disk is full")
        return record(response_id, value, **kwargs)

    monkeypatch.setattr(store, "record_feedback", broken_record)
    monkeypatch.setattr(Pieces, "rest", lambda self: 1 / 0)
    with _served(tiny_loaded, store, chat_options, data_dir) as server:
        report = fuzz_api(server.url, examples=12, headers=AUTH, response_id=_first_reply(server.url),
                          max_tokens=chat_options.max_new_tokens_limit)
    found = {(f.operation, f.problem) for f in report.server_errors}
    assert ("POST /v1/feedback (positive)", "server error") in found, report.by_operation
    assert ("POST /v1/chat/completions (positive)", "server error in the event stream") in found
    assert report.findings == report.server_errors  # nothing else is wrong
    failed = next(f for f in report.server_errors if f.status == 500)
    assert '"code":"internal_error"' in failed.body and "the disk is full" not in failed.body


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE"])
def test_every_method_a_path_does_not_take_is_an_openai_405(server, method):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.request(method, "/v1/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        if method != "HEAD":
            assert r.json()["error"]["code"] == "method_not_allowed"
            r = client.request(method, "/v1/nothing-here")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
