"""Health and Prometheus metrics of the serving process.

`Metrics` counts what this process did (chat requests by outcome, their
latency, tokens generated, thumbs refused by the rate limit) and, at each scrape,
reads from the database what every process did (feedback by value, runs by
status, the last run's duration, the active version), so the figures agree
with `app.py status` whichever process wrote them. Each app has its own
registry: several apps in one process (tests) do not share counters.

``GET /healthz`` answers 200 once the model is loaded and serving, with the
version that serves; before that (the server answers while the model loads)
it answers 503 with what it is doing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from storage import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


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


class Metrics:
    def __init__(self, store: Store, serving_version=lambda: "v0", feedback_refused=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("chatbot_chat_requests", "Chat requests (page and API) by outcome",
                                ["outcome"], registry=self.registry)
        for outcome in ("ok", "stopped", "busy", "error"):
            self.requests.labels(outcome)
        self.latency = Histogram("chatbot_chat_latency_seconds", "Time to a whole reply",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("chatbot_generated_tokens", "Tokens generated in replies", registry=self.registry)
        self.registry.register(_StoreCollector(store, serving_version))
        self.registry.register(_RefusedCollector(feedback_refused))

    def observe(self, outcome: str, generation=None) -> None:
        """One chat request (a `Policy` listener): `outcome` is ok, stopped, busy or error."""
        self.requests.labels(outcome).inc()
        if generation is not None:
            self.latency.observe(generation.latency_ms / 1000)
            self.tokens.inc(generation.completion_tokens)

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
