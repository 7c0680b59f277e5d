"""A storm of streamed replies, some of whose clients go away half-way,
leaves the server as it found it: open files and threads back where they
were after a warm-up, no request still counted as waiting for the model, and
every reply stored (the abandoned ones as stopped)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatbot.policy import GenerationSettings, Policy
from chatbot.server import BackgroundServer, create_app
from chatbot.ui import ChatOptions

CLIENTS, WARMUP, STORM = 8, 48, 240
DROP_EVERY = 5  # every fifth client reads the first piece of its stream and hangs up


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def stream_once(url: str, i: int) -> str:
    """One streamed reply: 'done', or 'dropped' after its first piece (the
    first piece, whatever it holds: a sampled reply may end at once, and the
    client must still hang up)."""
    drop = i % DROP_EVERY == 0
    body = {"messages": [{"role": "user", "content": f"hello {i}"}], "stream": True,
            "max_tokens": 64 if drop else 8, "temperature": 1.0}
    with httpx.Client(base_url=url, timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        lines = []
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if drop:
                return "dropped"  # leaving the block closes the connection mid-reply
        assert lines[-1] == "data: [DONE]" and all("server_error" not in x for x in lines), lines[-3:]
        return "done"


def storm(url: str, start: int, count: int) -> list[str]:
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: stream_once(url, i), range(start, start + count)))


@pytest.fixture
def idle_workers_pruned_quickly(monkeypatch):
    """anyio keeps an idle worker thread for 10 s, and prunes it only when
    the next job comes: here after half a second, so that the threads can be
    counted after a short rest (`at_rest`)."""
    from anyio._backends._asyncio import WorkerThread

    monkeypatch.setattr(WorkerThread, "MAX_IDLE_TIME", 0.5)


def at_rest(url: str) -> None:
    time.sleep(1.0)
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # a worker's job: idle ones are pruned


def settled(measure, ceiling: int, timeout: float = 30.0) -> int:
    """`measure()` once it is at most `ceiling`, or its last value at the
    deadline: what a reply in its last step still holds is let go."""
    deadline = time.monotonic() + timeout
    while (value := measure()) > ceiling and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_a_storm_of_streams_with_clients_hanging_up_leaves_files_and_threads_flat(
        tiny_loaded, store, idle_workers_pruned_quickly):
    policy = Policy(tiny_loaded)
    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=8), max_new_tokens_limit=64)
    with BackgroundServer(create_app(policy, store, options)) as server:
        assert set(storm(server.url, 0, WARMUP)) == {"done", "dropped"}
        settled(lambda: policy._in_flight, 0)
        at_rest(server.url)
        files, threads, connections = open_files(), threading.active_count(), store.open_connections()

        outcomes = storm(server.url, WARMUP, STORM)
        assert outcomes.count("dropped") == STORM // DROP_EVERY

        assert settled(lambda: policy._in_flight, 0) == 0  # no request left counted as waiting
        at_rest(server.url)
        # The store's pool opened all its connections at the first request, and no more since.
        assert store.open_connections() == connections == 8
        files_allowed = files + 4
        after_files = settled(open_files, files_allowed)
        after_threads = settled(threading.active_count, threads + 2)
        assert after_files <= files_allowed, (files, after_files)
        assert after_threads <= threads + 2, (threads, after_threads, [t.name for t in threading.enumerate()])

        # Every reply was stored; those whose client left stopped early.
        deadline = time.monotonic() + 30
        while store.counts()["responses"] < WARMUP + STORM and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.counts()["responses"] == WARMUP + STORM
        with store.connection() as db:
            reasons = dict(db.execute("SELECT finish_reason, COUNT(*) FROM responses GROUP BY 1").fetchall())
        assert reasons.get("stopped", 0) >= STORM // DROP_EVERY // 2, reasons
        # and the server still answers
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2})
        assert r.status_code == 200 and json.loads(r.text)["id"]
