"""Fuzzing the HTTP API from its own OpenAPI schema (`/v1/openapi.json`).

Schemathesis turns each operation of the schema into a Hypothesis strategy
of requests: positive cases fit the schema (and mostly reach the model),
negative ones break it on purpose (wrong types, missing fields, values out
of range). Every case is sent to a running server over HTTP, and what it
answers is judged: never a 5xx, and under /v1 every error in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`). Cases are not shrunk:
every bad answer is collected, so one run reports all it found.

Generation is derandomized (the same cases every run), so a test built on it
cannot flake. Used by `tests/test_fuzz.py` (a small budget against a tiny
model) and `benchmarks/bench_reliability.py` (a larger one against the real
server process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Finding:
    """One answer that breaks the rules, with what reproduces it."""

    operation: str
    status: int
    problem: str
    body: str
    curl: str

    def __str__(self) -> str:
        return f"{self.operation}: {self.status} {self.problem}\n  {self.body[:300]}\n  {self.curl[:600]}"


@dataclass
class FuzzReport:
    cases: dict[str, int] = field(default_factory=dict)  # "POST /v1/feedback (negative)" -> cases sent
    statuses: dict[int, int] = field(default_factory=dict)
    by_operation: dict[str, dict[int, int]] = field(default_factory=dict)  # label -> status -> count
    findings: list[Finding] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    @property
    def server_errors(self) -> list[Finding]:
        return [f for f in self.findings if f.problem.startswith("server error")]

    def record(self, label: str, method: str, path: str, response, curl) -> None:
        for counts in (self.statuses, self.by_operation.setdefault(label, {})):
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
        problem = judge(response.status_code, response.content, path, method=method)
        if problem is None and label == OTHER_METHODS and response.status_code != 405:
            problem = "a method the path does not take is not answered 405"
        if problem:
            self.findings.append(Finding(label, response.status_code, problem,
                                         response.content.decode("utf-8", "replace"), curl()))


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")
OTHER_METHODS = "other methods"


def judge(status: int, body: bytes, path: str, *, method: str = "GET") -> str | None:
    """What is wrong with an answer, or None."""
    if status >= 500:
        return "server error"
    if status == 200 and b'"type": "server_error"' in body and body.lstrip().startswith(b"data:"):
        return "server error in the event stream"
    if method == "HEAD":  # no body to judge
        return None
    if status >= 400 and path.startswith("/v1/"):
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        if not isinstance(error, dict) or set(error) != ERROR_KEYS or not error.get("message"):
            return "error body not in OpenAI's shape"
    return None


def steer(path: str, body, n: int, *, response_id: str | None, max_tokens: int, versions: list[str]) -> None:
    """Nudge every other positive case past the checks that refuse nearly
    every generated request, so that the paths behind them are fuzzed too:
    a chat whose last message is a user's with text and whose reply cap is
    within the server's (it reaches the model; every other one streamed), thumbs of +1 or -1 (or a
    correction) on a reply that exists (they reach the database), a promotion or rollback to
    a version in the registry (it swaps the model, or is refused with 409).
    Everything else stays as generated; the other half is left alone."""
    if n % 2 or not isinstance(body, dict):
        return
    if versions and path in ("/v1/admin/promote", "/v1/admin/rollback"):
        body["version" if path.endswith("promote") else "to"] = versions[(n // 2) % len(versions)]
        return
    if path == "/v1/feedback":
        if response_id and "response_id" in body:
            body["response_id"] = response_id
        if isinstance(body.get("correction"), str):  # a correction: some text, with a thumbs-down if any
            body["correction"] = body["correction"].strip()[:200] or f"a better reply {n}"
            if "value" in body:
                body["value"] = -1
        elif isinstance(body.get("value"), int):
            body["value"] = 1 if body["value"] >= 0 else -1
        elif "response_id" in body and body.get("correction") is None:
            body.pop("correction", None)
            body["value"] = 1
    elif path == "/v1/chat/completions":
        messages = body.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            last = messages[-1]
            last["role"] = "user"
            if not isinstance(last.get("content"), str) or not last["content"].strip():
                last["content"] = f"hello {n}"
        body["stream"] = (n // 2) % 2 == 1
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > max_tokens:
                body[key] = 1 + body[key] % max_tokens


def fuzz_api(base_url: str, *, examples: int, headers: dict | None = None, response_id: str | None = None,
             max_tokens: int = 64, versions: list[str] = (), exclude: tuple[str, ...] = (),
             timeout: float = 120.0, progress=lambda line: None) -> FuzzReport:
    """Send up to `examples` positive and `examples` negative cases to every
    operation of the server's schema, then each path every method it does
    not take. `headers` go with every request (an operator token, say). Half
    the positive cases are steered (`steer`) to `response_id`, a reply that
    exists, to at most `max_tokens` new tokens, the server's cap, and to
    `versions` of the registry. Paths in `exclude` are left out."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/v1/openapi.json", timeout=timeout)
    operations = [op for op in (result.ok() for result in schema.get_all_operations()) if op.path not in exclude]
    steering = partial(steer, response_id=response_id, max_tokens=max_tokens, versions=list(versions))
    report = FuzzReport()
    with requests.Session() as session:
        send = dict(base_url=base_url, session=session, headers=headers, timeout=timeout)
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                _fuzz_operation(operation, mode, label, report, examples=examples, send=send,
                                steered=steering if mode.is_positive else None)
                progress(f"{label}: {report.cases[label]} cases")
        # Every path with each method it does not take: a 405, in OpenAI's shape.
        declared: dict[str, set[str]] = {}
        for operation in operations:
            declared.setdefault(operation.path, set()).add(operation.method.upper())
        report.cases[OTHER_METHODS] = 0
        for path, methods in declared.items():
            for method in (m for m in METHODS if m not in methods):
                report.cases[OTHER_METHODS] += 1
                response = session.request(method, base_url + path, headers=headers, timeout=timeout)
                report.record(OTHER_METHODS, method, path, response, lambda: f"curl -X {method} {base_url + path}")
        progress(f"{OTHER_METHODS}: {report.cases[OTHER_METHODS]} cases")
    return report


def _fuzz_operation(operation, mode, label: str, report: FuzzReport, *, examples: int, send: dict,
                    steered) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    report.cases[label] = 0

    # Only the generate phase, no shrinking: the test never raises, it records.
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case):
        n = report.cases[label]
        report.cases[label] = n + 1
        if steered:
            steered(operation.path, case.body, n)
        response = case.call(**send)
        report.record(label, operation.method.upper(), operation.path, response,
                      lambda: case.as_curl_command(headers=dict(response.request.headers), verify=False))

    try:
        one()
    except Unsatisfiable:  # nothing to break (GET /v1/models takes no input)
        pass
