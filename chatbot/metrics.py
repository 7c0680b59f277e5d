"""Health and Prometheus metrics of the serving process.

`Metrics` counts what this process did (chat requests by outcome, thumbs
refused by the rate limit) and what LLM-server operators watch, under vLLM's
metric names so that dashboards made for vLLM read it: requests running in
the batch and waiting for a row (``vllm:num_requests_running``,
``vllm:num_requests_waiting``), time to first token and per output token
(``vllm:time_to_first_token_seconds``, ``vllm:time_per_output_token_seconds``),
whole-request latency (``vllm:e2e_request_latency_seconds``) and tokens in and
out (``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``); beside
them the batch itself (``chatbot_decode_steps_total`` and
``chatbot_decode_rows_total``: their rates' ratio is the mean batch size;
``chatbot_max_batch``) and ``chatbot_generation_tokens_per_second`` since the
previous scrape. At each scrape it also reads from the database what every
process did (feedback by value, runs by status, the last run's duration, the
active version), so the figures agree with `app.py status` whichever process
wrote them. Each app has its own registry: several apps in one process
(tests) do not share counters.

``GET /healthz`` answers 200 once the model is loaded and serving, with the
version that serves; before that (the server answers while the model loads)
it answers 503 with what it is doing.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from storage import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
# vLLM's buckets for the same histograms
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _StoreCollector(Collector):
    """Figures read from the database at scrape time."""

    def __init__(self, store: Store, serving_version):
        self.store = store
        self.serving_version = serving_version

    def collect(self):
        counts = self.store.counts()
        feedback = CounterMetricFamily("chatbot_feedback", "Thumbs recorded, by value (all processes)",
                                       labels=["value"])
        for value in ("up", "down", "withdrawn"):
            feedback.add_metric([value], counts["feedback_by_value"].get(value, 0))
        yield feedback
        runs = GaugeMetricFamily("chatbot_runs", "Retrain runs by status", labels=["status"])
        for status in ("running", "succeeded", "failed", "refused"):
            runs.add_metric([status], counts["runs_by_status"].get(status, 0))
        yield runs
        last = self.store.last_finished_run()
        duration = GaugeMetricFamily("chatbot_last_run_duration_seconds",
                                     "Wall time of the last finished retrain run", labels=["status"])
        if last is not None:
            duration.add_metric([last["status"]], last["seconds"])
        yield duration
        active = self.store.active_version()
        info = InfoMetricFamily("chatbot_version", "The active version in the registry and the one serving here")
        info.add_metric([], {"active": active, "serving": self.serving_version()})
        yield info
        number = GaugeMetricFamily("chatbot_active_version_number", "The active version's number (0: the base)")
        number.add_metric([], int(active[1:]))
        yield number


class _RefusedCollector(Collector):
    def __init__(self, refused):
        self.refused = refused

    def collect(self):
        yield CounterMetricFamily("chatbot_feedback_refused", "Thumbs refused by the rate limit (this process)",
                                  value=self.refused())


class _EngineCollector(Collector):
    """The batch as it is at scrape time (`chatbot.engine.Engine`)."""

    def __init__(self, engine):
        self.engine = engine
        self._last = (time.monotonic(), engine.generated)

    def collect(self):
        engine = self.engine
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch", value=engine.running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a row in the batch",
                                value=engine.waiting)
        yield GaugeMetricFamily("chatbot_max_batch", "Rows the batch may hold (--max-batch)", value=engine.max_batch)
        yield CounterMetricFamily("chatbot_decode_steps", "Decode steps run", value=engine.steps)
        yield CounterMetricFamily("chatbot_decode_rows", "Rows summed over decode steps (their rate over the "
                                  "steps' rate is the mean batch size)", value=engine.rows_stepped)
        now, generated = time.monotonic(), engine.generated
        then, before = self._last
        self._last = (now, generated)
        yield GaugeMetricFamily("chatbot_generation_tokens_per_second",
                                "Tokens generated per second since the previous scrape",
                                value=(generated - before) / max(now - then, 1e-9))


class Metrics:
    def __init__(self, store: Store, serving_version=lambda: "v0", feedback_refused=lambda: 0, engine=None):
        self.registry = CollectorRegistry()
        self.requests = Counter("chatbot_chat_requests", "Chat requests (page and API) by outcome",
                                ["outcome"], registry=self.registry)
        for outcome in ("ok", "stopped", "busy", "error"):
            self.requests.labels(outcome)
        self.latency = Histogram("vllm:e2e_request_latency_seconds", "Time from a request to its whole reply",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("vllm:time_to_first_token_seconds", "Time from a request to its first token",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.per_token = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                                   buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.tokens = Counter("vllm:generation_tokens", "Tokens generated in replies", registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.registry.register(_StoreCollector(store, serving_version))
        self.registry.register(_RefusedCollector(feedback_refused))
        if engine is not None:
            self.registry.register(_EngineCollector(engine))

    def observe(self, outcome: str, generation=None) -> None:
        """One chat request (a `Policy` listener): `outcome` is ok, stopped, busy or error."""
        self.requests.labels(outcome).inc()
        if generation is None:
            return
        self.latency.observe(generation.latency_ms / 1000)
        self.tokens.inc(generation.completion_tokens)
        self.prompt_tokens.inc(generation.prompt_tokens)
        if generation.first_token_ms is not None:
            self.first_token.observe(generation.first_token_ms / 1000)
            if generation.completion_tokens > 1:
                self.per_token.observe((generation.latency_ms - generation.first_token_ms) / 1000
                                       / (generation.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def loading_app(state: dict):
    """What answers on the server's port while the model loads: ``/healthz``
    says 503 and what is happening (``state["message"]``), everything else
    503 with Retry-After."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz():
        return JSONResponse({"status": "loading", "ready": False, "message": state.get("message", "")},
                            status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def loading(path: str):
        return JSONResponse({"error": {"message": "the model is loading, try again shortly",
                                       "type": "loading", "code": "loading"}},
                            status_code=503, headers={"Retry-After": "5"})

    return app
