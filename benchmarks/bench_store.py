"""Feedback writes per second: the `Store` against raw sqlite3, same run.

16 writer threads each record the same number of thumbs. The baseline is the
plainest code that does the same job safely: a sqlite3 connection per thread
on a database with the same schema and pragmas (WAL, synchronous=NORMAL,
busy timeout), one INSERT and COMMIT per thumb. Ours goes through
`Store.record_feedback` (validation, foreign-key check, BEGIN IMMEDIATE).

    python benchmarks/bench_store.py [--threads 16] [--per-thread 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import table, write_section  # noqa: E402
from storage import Store  # noqa: E402
from storage.store import BUSY_TIMEOUT_S, utcnow  # noqa: E402


def prepare(path: Path, n_responses: int) -> list[str]:
    store = Store(path)
    conv = store.start_conversation("bench")
    ids = [
        store.log_response(conversation_id=conv, prompt=[{"role": "user", "content": f"q{i}"}],
                           reply=f"a{i}", model_version="v0")
        for i in range(n_responses)
    ]
    store.close()
    return ids


def run_threads(n_threads, work):
    errors, barrier = [], threading.Barrier(n_threads + 1)

    def target(n):
        try:
            barrier.wait()
            work(n)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(repr(exc))

    threads = [threading.Thread(target=target, args=(n,)) for n in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, errors


def bench_store(path, ids, n_threads, per_thread):
    store = Store(path)

    def work(n):
        for i in range(per_thread):
            store.record_feedback(ids[(n * per_thread + i) % len(ids)], 1 if i % 2 else -1,
                                  session_id=f"s{n}", comment=None)

    seconds, errors = run_threads(n_threads, work)
    with store.connection() as db:
        count = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    store.close()
    return seconds, errors, count


def bench_raw(path, ids, n_threads, per_thread):
    def work(n):
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        for i in range(per_thread):
            conn.execute(
                "INSERT INTO feedback (response_id, session_id, user, value, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [ids[(n * per_thread + i) % len(ids)], f"s{n}", None, 1 if i % 2 else -1, None, utcnow()],
            )
            conn.commit()
        conn.close()

    seconds, errors = run_threads(n_threads, work)
    conn = sqlite3.connect(str(path))
    count = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    conn.close()
    return seconds, errors, count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--per-thread", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()
    expected = args.threads * args.per_thread
    results = {"store": [], "raw": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # Alternate the order so neither side always runs on a warmer disk cache.
            for name in (("store", "raw") if r % 2 == 0 else ("raw", "store")):
                path = Path(tmp) / f"{name}-{r}.db"
                ids = prepare(path, 200)
                fn = bench_store if name == "store" else bench_raw
                seconds, errors, count = fn(path, ids, args.threads, args.per_thread)
                results[name].append((expected / seconds, errors, count))
                print(f"{name}: {expected / seconds:,.0f} rows/s, {count}/{expected} rows, "
                      f"{len(errors)} errors", file=sys.stderr)
    rows, best = [], {}
    for name in ("store", "raw"):
        rates = sorted(x[0] for x in results[name])
        lost = sum(expected - x[2] for x in results[name])
        errs = sum(len(x[1]) for x in results[name])
        best[name] = rates[len(rates) // 2]
        label = "`Store.record_feedback`" if name == "store" else "raw `sqlite3` INSERT+COMMIT"
        rows.append([label, f"{best[name]:,.0f}", f"{rates[0]:,.0f} – {rates[-1]:,.0f}", lost, errs])
    ratio = best["store"] / best["raw"]
    body = table(["writer", "rows/s (median)", "range", "rows lost", "errors"], rows)
    body += (
        f"\n\n{args.threads} threads × {args.per_thread} thumbs each, {args.repeats} runs per side, "
        f"one transaction per thumb, WAL, synchronous=NORMAL.\n"
        f"Ratio Store / raw: **{ratio:.2f}** (goal: at least 0.5, zero rows lost)."
    )
    print(body)
    if not args.no_write:
        write_section("store-writes", "Feedback writes: Store against raw sqlite3",
                      "python benchmarks/bench_store.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
