"""/healthz while loading and once loaded, /metrics in Prometheus text that
moves with a chat and a thumb, and JSON log lines."""

from __future__ import annotations

import json
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_healthz_says_loading_until_the_model_is_loaded(tiny_loaded, store, chat_options):
    from chatbot.metrics import loading_app
    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app

    state = {"message": "starter model: step 40/800"}
    with BackgroundServer(loading_app(state)) as loading:
        r = httpx.get(loading.url + "/healthz")
        assert r.status_code == 503 and r.json() == {"status": "loading", "ready": False,
                                                      "message": "starter model: step 40/800"}
        r = httpx.post(loading.url + "/v1/chat/completions", json={})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    with BackgroundServer(create_app(Policy(tiny_loaded, version="v3"), store, chat_options)) as ready:
        r = httpx.get(ready.url + "/healthz")
        assert r.status_code == 200
        assert r.json()["ready"] is True and r.json()["version"] == "v3" and r.json()["device"] == "cpu"


def test_metrics_parse_as_prometheus_text_and_move_with_a_chat_and_a_thumb(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        before = _samples(r.text)
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 5}).json()
        assert client.post("/v1/feedback", json={"response_id": reply["id"], "value": 1}).status_code == 200
        after = _samples(client.get("/metrics").text)
    ok = ("chatbot_chat_requests_total", (("outcome", "ok"),))
    assert after[ok] == before[ok] + 1
    for histogram in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                      "vllm:time_per_output_token_seconds"):
        assert after[(histogram + "_count", ())] == before[(histogram + "_count", ())] + 1, histogram
    assert after[("vllm:generation_tokens_total", ())] - before[("vllm:generation_tokens_total", ())] == \
        reply["usage"]["completion_tokens"]
    assert after[("vllm:prompt_tokens_total", ())] - before[("vllm:prompt_tokens_total", ())] == \
        reply["usage"]["prompt_tokens"]
    # The batch: at rest nothing runs or waits; each token after the reply's first was a decode step.
    assert after[("vllm:num_requests_running", ())] == after[("vllm:num_requests_waiting", ())] == 0
    steps = reply["usage"]["completion_tokens"] - 1
    assert after[("chatbot_decode_steps_total", ())] - before[("chatbot_decode_steps_total", ())] == steps
    assert after[("chatbot_decode_rows_total", ())] - before[("chatbot_decode_rows_total", ())] == steps
    assert after[("chatbot_max_batch", ())] == 8
    assert after[("chatbot_generation_tokens_per_second", ())] > 0 or steps == 0
    up = ("chatbot_feedback_total", (("value", "up"),))
    assert before[up] == 0 and after[up] == 1
    assert after[("chatbot_version_info", (("active", "v0"), ("serving", "v0")))] == 1
    assert after[("chatbot_runs", (("status", "failed"),))] == 0


def test_metrics_report_runs_and_the_last_run_duration(server, store):
    run = store.start_run("ppo", watermark=0)
    store.finish_run(run, "failed", error="boom")
    samples = _samples(httpx.get(server.url + "/metrics").text)
    assert samples[("chatbot_runs", (("status", "failed"),))] == 1
    assert samples[("chatbot_last_run_duration_seconds", (("status", "failed"),))] >= 0


def test_json_log_lines(capsys):
    from chatbot import logs

    logs.configure(json_lines=True)
    try:
        logging.getLogger("chatbot.test").info("swapped to %s", "v2", extra={"version": "v2"})
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("chatbot.test").exception("failed")
    finally:
        logs.configure(json_lines=False)
        logging.getLogger().handlers[:] = []
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["message"] == "swapped to v2" and first["version"] == "v2" and first["level"] == "info"
    assert first["logger"] == "chatbot.test" and first["time"].endswith("+00:00")
    assert second["level"] == "error" and "ValueError: bad" in second["exception"]
