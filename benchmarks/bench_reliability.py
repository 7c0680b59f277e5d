"""Reliability of the served chatbot, measured from outside its process.

Runs `python app.py serve` as a child process (as an operator would) on a
scratch data directory, the starter model linked into it from --data-dir (or
the model directory named by --model), and measures it over HTTP and /proc:

1. **Streams.** --streams streamed replies from --clients clients at once,
   every --drop-every-th client hanging up after the first piece of its
   reply; the server's open files, threads and resident memory after a
   warm-up of --warmup such requests and at the end (goal: flat, within 5%).
2. **Oversized requests.** The time to refuse a request of 200 messages of
   8,000 characters (goal: under 50 ms, a 413), idle and under load; the p50
   latency of 4 clients chatting back to back, in windows where one such
   request arrives every second against windows where none does, alternating
   (goal: within 10%).
3. **The API fuzz** of tests/api_fuzz.py against this process: cases tried,
   5xx found (goal: 0). The operator token is set, so the operator routes are
   fuzzed past their login; /v1/admin/retrain is left out (it would start real
   training processes; the test suite fuzzes it with one that exits at once).
4. **kill -9 during a thumbs storm**, --kills times: --thumb-clients clients
   send thumbs as fast as they are answered, the server's process group is
   killed with SIGKILL at a random moment, and every thumb it acknowledged
   must be in the database (goal: none lost); the server is restarted on the
   same data directory for the next round.

Extra `serve` flags go through --serve-arg (repeatable); a
--max-thumbs-per-minute flag, where `serve` has one, is raised out of the
way of the thumbs storm unless given. --header adds a header to every
request (an API key, say).

    python benchmarks/bench_reliability.py --data-dir /work/cache [--streams 2000] [--kills 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import percentile, table, write_section  # noqa: E402

PROMPTS = ["hello", "how are you", "what do you like to do", "tell me about yourself", "do you like music",
           "what is your name", "what is a computer", "good morning"]
THUMBS_FLAG = "--max-thumbs-per-minute"


STARTED = time.monotonic()


def log(line: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {line}", file=sys.stderr, flush=True)


def change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "n/a"


class ServerProcess:
    """`python app.py serve` on one data directory and port; restartable."""

    def __init__(self, data_dir: Path, model: str, port: int, flags: list[str], log_path: Path):
        self.data_dir, self.model, self.port, self.flags, self.log_path = data_dir, model, port, flags, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until the API answers; seconds it took."""
        started = time.perf_counter()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "app.py"), "serve", "--data-dir", str(self.data_dir), "--model",
                 self.model, "--port", str(self.port), "--device", "cpu", "--retrain-every", "0", *self.flags],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill(signal.SIGKILL)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def resources(self) -> dict:
        """Open files (and how many are the database's and sockets), threads
        and resident memory of the server process."""
        pid = self.proc.pid
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        return {"files": len(targets), "database": sum(".db" in t for t in targets),
                "sockets": sum(t.startswith("socket:") for t in targets), "threads": int(status["Threads"]),
                "rss_mb": int(status["VmRSS"].split()[0]) / 1024}

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


# -- 1. a storm of streams ---------------------------------------------------------


def stream_once(client: httpx.Client, i: int, drop: bool, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
            "max_tokens": max_tokens * 3 if drop else max_tokens, "temperature": 0.8}
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return f"status {r.status_code}"
            last = ""
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                last = line
                if "server_error" in line:
                    return "error event"
                if drop and '"content": "' in line and '"content": ""' not in line:
                    return "dropped"  # leaving the block closes the connection mid-reply
            return "done" if last == "data: [DONE]" else "cut short"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def stream_storm(server: ServerProcess, headers: dict, start: int, count: int, *, clients: int, drop_every: int,
                 max_tokens: int, on_progress=lambda done: None) -> dict:
    outcomes: dict[str, int] = {}
    lock, counter = threading.Lock(), iter(range(start, start + count))

    def worker() -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                outcome = stream_once(client, i, drop_every > 0 and i % drop_every == 0, max_tokens)
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    done = sum(outcomes.values())
                on_progress(done)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return outcomes


def settle(server: ServerProcess, headers: dict, seconds: float) -> dict:
    """The server's resources at rest: after `seconds` idle and one small
    request (the server's worker threads that have been idle for 10 s are let
    go when the next request comes, not before)."""
    time.sleep(seconds)
    httpx.get(server.url + "/v1/models", headers=headers, timeout=30).raise_for_status()
    time.sleep(0.5)
    return server.resources()


def bench_streams(server: ServerProcess, headers: dict, args) -> tuple[str, dict]:
    log(f"streams: warm-up of {args.warmup}")
    warm_outcomes = stream_storm(server, headers, 0, args.warmup, clients=args.clients, drop_every=args.drop_every,
                                 max_tokens=args.max_tokens)
    warm = settle(server, headers, args.settle)
    samples = [("after the warm-up, at rest", args.warmup, warm)]
    every = max(1, args.streams // 8)
    marks = set(range(every, args.streams, every))
    started = time.perf_counter()

    def on_progress(done: int) -> None:
        if done in marks:
            samples.append(("under load", args.warmup + done, server.resources()))
            log(f"streams: {done}/{args.streams} {samples[-1][2]}")

    outcomes = stream_storm(server, headers, args.warmup, args.streams, clients=args.clients,
                            drop_every=args.drop_every, max_tokens=args.max_tokens, on_progress=on_progress)
    wall = time.perf_counter() - started
    end = settle(server, headers, args.settle)
    samples.append(("at the end, at rest", args.warmup + args.streams, end))
    rows = [[when, n, r["files"], r["database"], r["sockets"], r["threads"], f"{r['rss_mb']:.0f}"]
            for when, n, r in samples]
    flat = {k: abs(end[k] - warm[k]) <= 0.05 * warm[k] for k in ("files", "threads", "rss_mb")}
    body = table(["when", "requests so far", "open files", "of which the database's", "of which sockets",
                  "threads", "RSS MB"], rows)
    body += (f"\n\nFrom the warm-up to the end: open files {warm['files']} -> {end['files']} "
             f"({change(warm['files'], end['files'])}), threads {warm['threads']} -> {end['threads']} "
             f"({change(warm['threads'], end['threads'])}), RSS {warm['rss_mb']:.0f} -> {end['rss_mb']:.0f} MB "
             f"({change(warm['rss_mb'], end['rss_mb'])}); goal: each within 5%: "
             f"**{'met' if all(flat.values()) else 'not met'}**"
             + ("" if all(flat.values()) else f" ({', '.join(k for k, ok in flat.items() if not ok)})") + ".\n\n"
             f"{args.streams:,} streamed replies after a warm-up of {args.warmup} ({args.clients} clients at once, "
             f"up to {args.max_tokens} new tokens, temperature 0.8) in {wall:.0f} s; every {args.drop_every}th "
             f"client asks for up to {args.max_tokens * 3} tokens and hangs up after the first piece. Outcomes: "
             + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items()))
             + f" (warm-up: {', '.join(f'{k} {v}' for k, v in sorted(warm_outcomes.items()))}). "
             f"Resources are read from /proc at rest, {args.settle:g} s idle and one request later (the "
             f"server lets a worker thread go once it has been idle 10 s, when the next request comes); under "
             f"load, as they were. The database's files are those of the store's pooled SQLite connections (8, "
             f"all opened at the first request; each holds the database and its WAL file open): {warm['database']} after the warm-up, "
             f"{end['database']} at the end; other open files: {warm['files'] - warm['database']} and "
             f"{end['files'] - end['database']}.")
    return body, {"warm": warm, "end": end, "outcomes": outcomes, "flat": flat}


# -- 2. oversized requests -----------------------------------------------------------


def oversized_body() -> bytes:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": ("lorem ipsum " * 700)[:8000]}
                for i in range(199)] + [{"role": "user", "content": ("lorem ipsum " * 700)[:8000]}]
    return json.dumps({"messages": messages, "max_tokens": 16}).encode()


def refuse_once(url: str, headers: dict, body: bytes) -> tuple[float, int]:
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        started = time.perf_counter()
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        return (time.perf_counter() - started) * 1000, r.status_code


class ChatLoad:
    """Clients sending chat requests back to back; each latency is tagged
    with the window it started in."""

    def __init__(self, url: str, headers: dict, clients: int, max_tokens: int):
        self.url, self.headers, self.max_tokens = url, headers, max_tokens
        self.window = "warm-up"
        self.results: list[tuple[str, float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=300) as client:
            i = worker
            while not self._stop.is_set():
                window, started = self.window, time.perf_counter()
                try:
                    status = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": self.max_tokens, "temperature": 0.8}).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((window, (time.perf_counter() - started) * 1000, status))
                i += 1

    def __enter__(self) -> "ChatLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def latencies(self, window: str) -> list[float]:
        return [ms for w, ms, status in self.results if w == window and status == 200]

    def failed(self, window: str) -> int:
        return sum(1 for w, _, status in self.results if w == window and status != 200)


def bench_oversized(server: ServerProcess, headers: dict, args) -> tuple[str, dict]:
    body = oversized_body()
    idle = [refuse_once(server.url, headers, body) for _ in range(10)]
    log(f"oversized, idle: {[f'{ms:.1f}' for ms, _ in idle]}")
    under_load: list[tuple[float, int]] = []
    with ChatLoad(server.url, headers, 4, args.max_tokens) as load:
        time.sleep(3)
        for w in range(args.windows):
            window = "with" if w % 2 else "without"
            load.window = window
            log(f"oversized: window {w + 1}/{args.windows}, {window} one a second")
            end = time.monotonic() + args.window
            while time.monotonic() < end:
                tick = time.monotonic()
                if window == "with":
                    under_load.append(refuse_once(server.url, headers, body))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        load.window = "done"
    without, with_ = load.latencies("without"), load.latencies("with")
    ratio = statistics.median(with_) / statistics.median(without)
    refusals = [ms for ms, _ in idle + under_load]
    statuses = sorted({status for _, status in idle + under_load})
    rows = [
        ["idle", len(idle), f"{statistics.median([m for m, _ in idle]):.1f}", f"{max(m for m, _ in idle):.1f}"],
        ["while 4 clients chat", len(under_load), f"{statistics.median([m for m, _ in under_load]):.1f}",
         f"{max(m for m, _ in under_load):.1f}"],
    ]
    body_text = table(["refusing 200 messages x 8,000 characters", "requests", "median ms", "max ms"], rows)
    body_text += (f"\n\nStatuses: {', '.join(map(str, statuses))} (the body is {len(body) / 2**20:.1f} MiB; "
                  f"refused on its declared length, before it is read). Goal: under 50 ms: "
                  f"**{'met' if max(refusals) < 50 else 'not met'}** (slowest {max(refusals):.1f} ms).\n\n")
    body_text += table(["4 clients chatting back to back", "requests", "failed", "p50 ms", "p95 ms"], [
        [f"{name} one oversized request a second", len(lat), load.failed(window), f"{percentile(lat, 0.5):.0f}",
         f"{percentile(lat, 0.95):.0f}"] for name, window, lat in (("without", "without", without),
                                                                  ("with", "with", with_))])
    noise = " (faster with them: the windows differ by more than the effect)" if ratio < 0.9 else ""
    body_text += (f"\n\np50 with / without: **{ratio:.2f}**{noise}; goal: at most 10% slower: "
                  f"**{'met' if ratio <= 1.10 else 'not met'}**. {args.windows} windows of {args.window:g} s "
                  f"alternate, starting without; up to {args.max_tokens} new tokens a reply.")
    return body_text, {"refuse_max_ms": max(refusals), "ratio": ratio, "statuses": statuses}


# -- 3. the API fuzz -----------------------------------------------------------------


def bench_fuzz(server: ServerProcess, headers: dict, admin: dict, args) -> tuple[str, dict]:
    from tests.api_fuzz import fuzz_api

    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    r.raise_for_status()
    started = time.perf_counter()
    report = fuzz_api(server.url, examples=args.fuzz_examples, headers={**headers, **admin},
                      response_id=r.json()["id"], max_tokens=args.max_tokens, exclude=("/v1/admin/retrain",),
                      progress=log)
    wall = time.perf_counter() - started
    rows = [[label, n, ", ".join(f"{s}: {c}" for s, c in sorted(report.by_operation.get(label, {}).items()))]
            for label, n in report.cases.items()]
    text = table(["operation (cases)", "cases", "answers by status"], rows)
    text += (f"\n\n{report.total:,} cases in {wall:.0f} s, up to {args.fuzz_examples} per operation and mode "
             f"(fixed seed). 5xx found: **{len(report.server_errors)}** (goal: 0); other bad answers (an error not "
             f"in OpenAI's shape, a method not answered 405): {len(report.findings) - len(report.server_errors)}.")
    for finding in report.findings[:5]:
        text += f"\n\n```\n{finding}\n```"
    return text, {"cases": report.total, "server_errors": len(report.server_errors),
                  "findings": len(report.findings)}


# -- 4. kill -9 during a thumbs storm ------------------------------------------------


def thumbs_round(server: ServerProcess, headers: dict, response_ids: list[str], clients: int,
                 kill_after: float, rng: random.Random) -> tuple[list[tuple[int, str, int]], int]:
    """Thumbs from `clients` clients until the server is killed `kill_after`
    seconds in: the acknowledged (feedback id, response id, value), and how
    many requests were sent."""
    acked: list[tuple[int, str, int]] = []
    sent = [0]
    lock, dead = threading.Lock(), threading.Event()
    plans = [[(rng.choice(response_ids), rng.choice((1, -1))) for _ in range(20_000)] for _ in range(clients)]

    def worker(n: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            for response_id, value in plans[n]:
                if dead.is_set():
                    return
                try:
                    r = client.post("/v1/feedback", json={"response_id": response_id, "value": value,
                                                          "user": f"storm-{n}"})
                except httpx.HTTPError:
                    if dead.is_set():
                        return
                    continue
                with lock:
                    sent[0] += 1
                    if r.status_code == 200:
                        acked.append((r.json()["id"], response_id, value))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_after)
    server.kill(signal.SIGKILL)
    dead.set()
    for t in threads:
        t.join(timeout=60)
    return acked, sent[0]


def query(db_path: Path, sql: str, *params) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return db.execute(sql, params).fetchall()


def bench_kills(server: ServerProcess, headers: dict, args) -> tuple[str, dict]:
    db_path = server.data_dir / "chatbot.db"
    response_ids = [row[0] for row in query(db_path, "SELECT id FROM responses ORDER BY id LIMIT 1000")]
    rng = random.Random(args.seed)
    rows, lost_total, acked_total, restarts = [], 0, 0, []
    for k in range(args.kills):
        before = query(db_path, "SELECT COALESCE(MAX(id), 0) FROM feedback")[0][0]
        kill_after = rng.uniform(0.5, 2.0)
        acked, sent = thumbs_round(server, headers, response_ids, args.thumb_clients, kill_after, rng)
        stored = {row[0]: (row[1], row[2])
                  for row in query(db_path, "SELECT id, response_id, value FROM feedback WHERE id > ?", before)}
        lost = [a for a in acked if stored.get(a[0]) != (a[1], a[2])]
        lost_total += len(lost)
        acked_total += len(acked)
        rows.append([k + 1, f"{kill_after:.2f}", sent, len(acked), len(stored) - len(acked) + len(lost), len(lost)])
        log(f"kill {k + 1}/{args.kills}: {len(acked)} acknowledged, {len(lost)} lost, {len(stored)} stored")
        restarts.append(server.start())
    integrity = query(db_path, "PRAGMA integrity_check")[0][0]
    text = table(["kill", "after s", "thumbs sent", "acknowledged", "stored, not acknowledged", "acknowledged, lost"],
                 rows)
    text += (f"\n\n{args.kills} rounds, {args.thumb_clients} clients sending thumbs back to back on the "
             f"{len(response_ids)} stored replies; the server's process group is killed with SIGKILL at a random "
             f"moment and restarted on the same data directory. Acknowledged thumbs lost: **{lost_total} of "
             f"{acked_total:,}** (goal: 0). \"Stored, not acknowledged\" are thumbs committed while their answer was "
             f"on its way when the server died. Restart to the first answer: median "
             f"{statistics.median(restarts):.1f} s, max {max(restarts):.1f} s; every restart served. "
             f"`PRAGMA integrity_check` at the end: {integrity}.")
    return text, {"lost": lost_total, "acked": acked_total, "integrity": integrity}


# -- the run -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags(extra: list[str]) -> list[str]:
    """--serve-arg flags, and a thumbs rate limit (where serve has one) out of the storm's way."""
    flags = list(extra)
    usage = subprocess.run([sys.executable, str(ROOT / "app.py"), "serve", "--help"], capture_output=True,
                           text=True).stdout
    if THUMBS_FLAG in usage and not any(f.startswith(THUMBS_FLAG) for f in flags):
        flags += [THUMBS_FLAG, "1000000"]
    return flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built there if missing)")
    parser.add_argument("--model", help="serve this model directory instead of the starter (a tiny one, for speed)")
    parser.add_argument("--streams", type=int, default=2000, help="streamed replies after the warm-up")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8, help="streaming clients at once")
    parser.add_argument("--drop-every", type=int, default=10, help="every Nth streaming client hangs up half-way")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens a reply, streamed or not")
    parser.add_argument("--settle", type=float, default=11.0, help="idle seconds before resources are read")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of each window, with and without")
    parser.add_argument("--windows", type=int, default=12, help="windows in all, alternating")
    parser.add_argument("--fuzz-examples", type=int, default=100, help="fuzz cases per operation and mode")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 rounds of the thumbs storm")
    parser.add_argument("--thumb-clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                        help="an extra flag for `app.py serve` (repeatable), e.g. --serve-arg=--max-messages=64")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a header sent with every request (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()

    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    token = secrets.token_urlsafe(24)
    work = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    data_dir = work / "data"
    if args.model:
        model, model_words = str(Path(args.model).resolve()), f"the model in `{args.model}`"
    else:
        from chatbot.models import resolve_model_path

        starter = Path(resolve_model_path("starter", args.data_dir, build_progress=log)).resolve()
        (data_dir / "models").mkdir(parents=True)
        (data_dir / "models" / "starter").symlink_to(starter)
        model, model_words = "starter", "the starter model"
    flags = serve_flags(args.serve_arg) + ["--admin-token", token]
    server = ServerProcess(data_dir, model, free_port(), flags, work / "server.log")
    log(f"scratch directory {work}; serve flags: {' '.join(flags[:-2])}")
    load_before = os.getloadavg()
    first_start = server.start()
    log(f"server up in {first_start:.1f} s")
    sections = {}
    try:
        sections["streams"] = bench_streams(server, headers, args)
        sections["oversized"] = bench_oversized(server, headers, args)
        sections["fuzz"] = bench_fuzz(server, headers, {"Authorization": f"Bearer {token}"}, args)
        sections["kills"] = bench_kills(server, headers, args)
    finally:
        server.kill(signal.SIGTERM)
    load_after = os.getloadavg()
    tracebacks = server.log_path.read_text(errors="replace").count("Traceback")

    shown = flags[:-2]  # not the token
    body = (f"`python app.py serve` as a child process on a scratch data directory, serving {model_words} on the "
            f"CPU, with `--retrain-every 0` and an operator token"
            + (f", and {' '.join(f'`{f}`' for f in shown)}" if shown else "") + ". "
            f"The machine is shared: its 1-minute load average was {load_before[0]:.1f} at the start and "
            f"{load_after[0]:.1f} at the end, on {os.cpu_count()} cores, so absolute timings can be disturbed; "
            f"the comparisons alternate their windows for that reason. Tracebacks in the server's log over the "
            f"whole run: {tracebacks}.\n\n"
            f"### Open files, threads and memory under a storm of streams\n\n{sections['streams'][0]}\n\n"
            f"### Refusing oversized requests, and what it costs the others\n\n{sections['oversized'][0]}\n\n"
            f"### The API fuzz against the server process\n\n{sections['fuzz'][0]}\n\n"
            f"### kill -9 during a thumbs storm\n\n{sections['kills'][0]}\n")
    print(body)
    print(json.dumps({k: v[1] for k, v in sections.items()}, default=str), file=sys.stderr)
    if not args.no_write:
        write_section("reliability", "Reliability: streams, oversized requests, fuzz, kill -9",
                      "python benchmarks/bench_reliability.py " + " ".join(sys.argv[1:]), body)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
