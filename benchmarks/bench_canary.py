"""Canary and watch on live thumbs: simulated people chat with a running server.

`python app.py serve` runs the starter as a child process. Simulated people
(`--people` identities, `--clients` at a time) ask held-out corpus prompts
through the API and rate every reply: thumbs-up when it is written in real
words (at least 90% of its words known to the corpus, `online_rl.language`),
flipped for a tenth of the thumbs (`--noise`). Versions differ only in how
much random noise their LoRA adds to the starter (`--scales`), which makes
them babble more or less; each version's true approval is measured beside.
Five live decisions, one after the other, on one server:

1. **a better candidate**: the active version is a noisy adapter (v1); a
   clean one (v2) goes on canary (`Store.start_canary`, as the gate does
   with `--canary`) on `--share` of new conversations, until live thumbs
   decide;
2. **a much worse candidate**: v2 is active; a very noisy v3 goes on canary;
3. **a slightly worse candidate**: a mildly noisy v4;
4. **a candidate as good**: v5, clean like v2 (what a non-inferiority test
   costs when there is no difference to find);
5. **the watch**: an operator promotes the noisy v1 over the clean version,
   and the watch compares its live approval with the clean version's.

For each: the decision and the thumbs it took (each arm), the conversations
the candidate served, the requests that failed, and the seconds.

    python benchmarks/bench_canary.py --data-dir /work/cache
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_operations import make_adapter  # noqa: E402
from benchmarks.bench_serving import TOKEN, Server, free_port, log  # noqa: E402
from benchmarks.report import table, write_section  # noqa: E402

DECIDED = ("promoted", "rejected", "passed", "rolled_back")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--clients", type=int, default=8, help="people chatting at once (default 8)")
    parser.add_argument("--people", type=int, default=2000, help="distinct identities (default 2000)")
    parser.add_argument("--share", type=float, default=0.1, help="the canary's share of conversations")
    parser.add_argument("--noise", type=float, default=0.1, help="share of thumbs flipped (default 0.1)")
    parser.add_argument("--scales", type=float, nargs=4, default=[0.12, 0.0, 0.2, 0.08],
                        metavar=("NOISY", "CLEAN", "WORSE", "SLIGHTLY_WORSE"),
                        help="LoRA noise of v1 to v4 (default 0.12 0.0 0.2 0.08); v5 is as clean as v2")
    parser.add_argument("--max-seconds", type=float, default=900, help="give a trial up after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    return parser


def liked(reply: str, rng: random.Random, noise: float) -> bool:
    from online_rl.language import known_word_fraction

    good = bool(reply.strip()) and (known_word_fraction([reply]) or 0.0) >= 0.9
    return good != (rng.random() < noise)


def until_decided(server: Server, store, trial_id: int, prompts: list[str], args, seed: int) -> dict:
    """People chat and rate until trial `trial_id` ends; what it took."""
    stop, lock = threading.Event(), threading.Lock()
    counts = {"requests": 0, "failed": 0, "thumbs": 0, "errors": []}

    def person_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=server.url, timeout=600) as client:
            while not stop.is_set():
                who = f"person-{rng.randrange(args.people)}"
                body = {"messages": [{"role": "user", "content": rng.choice(prompts)}], "user": who}
                try:
                    r = client.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
                    data = r.json()
                    value = 1 if liked(data["choices"][0]["message"]["content"], rng, args.noise) else -1
                    r = client.post("/v1/feedback", json={"response_id": data["id"], "value": value, "user": who})
                    r.raise_for_status()
                    with lock:
                        counts["requests"] += 1
                        counts["thumbs"] += 1
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        counts["failed"] += 1
                        counts["errors"] = (counts["errors"] + [repr(exc)[:200]])[-3:]

    started = time.monotonic()
    workers = [threading.Thread(target=person_loop, args=(i,)) for i in range(args.clients)]
    for w in workers:
        w.start()
    try:
        while time.monotonic() - started < args.max_seconds:
            trial = store.trial(trial_id)
            if trial["status"] != "running":
                break
            time.sleep(0.25)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=600)
    trial = store.trial(trial_id)
    served = store._query("SELECT COUNT(*) AS n FROM responses WHERE model_version = ? AND created_at >= ?",
                          [trial["version"], trial["started_at"]])[0]["n"]
    return {**counts, "trial": trial, "served": served, "seconds": round(time.monotonic() - started, 1)}


def true_approval(store, version: str, since: str | None = None, before: str | None = None) -> float | None:
    """The share of `version`'s replies (since `since`, or the last 1,000
    before `before`) that are in real words, without noise."""
    from online_rl.language import known_word_fraction

    if before is not None:
        rows = store._query("SELECT reply FROM responses WHERE model_version = ? AND created_at < ?"
                            " ORDER BY created_at DESC LIMIT 1000", [version, before])
    else:
        rows = store._query("SELECT reply FROM responses WHERE model_version = ? AND created_at >= ?",
                            [version, since])
    good = [bool(r["reply"].strip()) and (known_word_fraction([r["reply"]]) or 0.0) >= 0.9 for r in rows]
    return round(sum(good) / len(good), 3) if good else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers import AutoModelForCausalLM

    from chatbot.models import resolve_model_path
    from online_rl.simulate import corpus_prompts
    from storage import Store

    model_dir = Path(resolve_model_path("starter", args.data_dir))
    _, prompts = corpus_prompts(args.seed, 200)
    work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    data = work / "data"
    store = Store.in_data_dir(data)
    for number, scale in enumerate([*args.scales, args.scales[1]], start=1):
        path = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), data / "adapters" / f"v{number}",
                            number, str(model_dir), scale=scale)
        store.register_adapter(f"v{number}", path=str(path), base_model=str(model_dir))
    port = free_port()
    server = Server("ours", [sys.executable, str(ROOT / "app.py"), "serve", "--data-dir", str(data), "--model",
                             str(model_dir), "--device", "cpu", "--port", str(port), "--retrain-every", "0",
                             "--admin-token", TOKEN, "--follow-every", "0.5", "--canary", str(args.share)],
                    port, "/healthz", str(model_dir), work / "server.log")
    results = []
    with server:
        admin = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
        admin.post("/v1/admin/promote", json={"version": "v1"}).raise_for_status()
        plan = [("a better candidate (clean v2 beside noisy v1)", lambda: store.start_canary("v2", args.share)),
                ("a much worse candidate (very noisy v3 beside v2)", lambda: store.start_canary("v3", args.share)),
                ("a slightly worse candidate (mildly noisy v4 beside v2)",
                 lambda: store.start_canary("v4", args.share)),
                ("a candidate as good (clean v5 beside v2)", lambda: store.start_canary("v5", args.share)),
                ("the watch (an operator promotes noisy v1 over the clean active version)",
                 lambda: _promote(admin, store, "v1"))]
        for phase, (name, start) in enumerate(plan, start=1):
            trial = start()
            log(f"{name}: trial {trial['id']} ({trial['kind']} of {trial['version']} against {trial['other']})")
            result = until_decided(server, store, trial["id"], prompts, args, seed=phase)
            t = result["trial"]
            # A canary's arms ran side by side; a watch compares with the version before's past replies.
            other_replies = ({"since": t["started_at"]} if t["kind"] == "canary" else {"before": t["started_at"]})
            result.update(name=name, true_new=true_approval(store, t["version"], since=t["started_at"]),
                          true_other=true_approval(store, t["other"], **other_replies))
            log(f"{name}: {t['status']} after {result['seconds']} s: {t['reason']}; served {result['served']}, "
                f"failed {result['failed']} {result['errors']}")
            results.append(result)
        admin.close()
    body = report(results, store, args)
    print(body)
    if not args.no_write:
        write_section("canary", "Canary and watch on live thumbs", "python benchmarks/bench_canary.py "
                      + " ".join(argv if argv is not None else sys.argv[1:]), body)
    return 0 if all(r["trial"]["status"] in DECIDED for r in results) else 1


def _promote(admin: httpx.Client, store, version: str) -> dict:
    admin.post("/v1/admin/promote", json={"version": version}).raise_for_status()
    return next(t for t in store.running_trials() if t["kind"] == "watch" and t["version"] == version)


def report(results: list[dict], store, args) -> str:
    rows = []
    for r in results:
        t, ev = r["trial"], r["trial"]["evidence"] or {}
        new, other, diff = ev.get("new", {}), ev.get("other", {}), ev.get("difference", {})
        rows.append([r["name"], t["status"], new.get("thumbs"), other.get("thumbs"),
                     f"{new.get('approval')} [{new.get('low')}, {new.get('high')}]",
                     f"{other.get('approval')} [{other.get('low')}, {other.get('high')}]",
                     f"[{diff.get('low')}, {diff.get('high')}]", f"{r['true_new']} vs {r['true_other']}",
                     r["served"], r["requests"], r["failed"], r["seconds"]])
    others = [t for t in store.trials(20) if t["id"] not in {r["trial"]["id"] for r in results}]
    side = "\n".join(f"- trial {t['id']} ({t['kind']} of {t['version']} against {t['other']}): {t['status']}"
                     f"{': ' + t['reason'] if t['reason'] else ''}" for t in others)
    return (f"The starter served by `app.py serve --canary {args.share}` in a child process; {args.clients} "
            f"simulated people at a time out of {args.people} identities, each reply rated by whether it is "
            f"written in real words, a {args.noise:.0%} share of thumbs flipped; confidence 0.95, margin 0.05 "
            f"(the defaults). LoRA noise of v1 to v5: {[*args.scales, args.scales[1]]}. Approvals are the share of thumbs up "
            f"with the confidence sequence's interval at the decision; *true* is the share of the arm's "
            f"replies in real words, without noise.\n\n"
            + table(["decision", "outcome", "thumbs (candidate)", "thumbs (other)", "candidate approval",
                     "other approval", "difference", "true approval", "conversations the candidate served",
                     "requests", "failed", "seconds"], rows)
            + ("\n\nThe other trials of the run (the watch of each promotion):\n\n" + side if side else ""))


if __name__ == "__main__":
    raise SystemExit(main())
