"""Serving overhead, time to first token and throughput on the starter model.

Starts `python app.py serve` as a child process (as an operator would) and
measures it over HTTP, beside `model.generate` called directly in this process
on the same prompts and the same token counts:

- overhead: the same 40 prompts, greedy, through `/v1/chat/completions` and
  through `model.generate` with `max_new_tokens` set to the token count the
  server produced (so both produce the same tokens), interleaved request by request;
  total time ratio;
- time to first streamed token (`stream: true`);
- requests per second with 1, 4 and 8 concurrent clients.

    python benchmarks/bench_serving.py [--data-dir data] [--requests 24]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: str, db_dir: str, port: int) -> subprocess.Popen:
    # The model comes from data_dir (built once); the database is a scratch one.
    model_path = Path(data_dir) / "models" / "starter"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "serve", "--data-dir", db_dir, "--model", str(model_path),
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + proc.stderr.read())
    raise RuntimeError("server did not start")


def chat(client, prompt, **extra):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], **extra})
    r.raise_for_status()
    return r.json()


def first_token_ms(client, prompt, max_tokens) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
    }) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    return (time.perf_counter() - start) * 1000
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the overhead comparison")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import tempfile

    import torch

    from chatbot import starter
    from chatbot.models import load_model

    loaded = load_model("starter", args.data_dir)
    prompts = sorted(starter.corpus_replies())[::25][:40]
    port = free_port()
    with tempfile.TemporaryDirectory() as db_dir:
        proc = start_server(args.data_dir, db_dir, port)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            for p in prompts[:3]:  # warm up
                chat(client, p, max_tokens=args.max_tokens, temperature=0)

            # 1. overhead: same prompts, same tokens. The machine's speed drifts
            # (a shared VM), so the two sides are interleaved request by request,
            # in alternating order, and summed over every round.
            tok, model = loaded.tokenizer, loaded.model
            counts = [chat(client, p, max_tokens=args.max_tokens, temperature=0)["usage"]["completion_tokens"]
                      for p in prompts]
            inputs = []
            for p in prompts:
                text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False)
                inputs.append(text)

            def direct(i):
                ids = tok(inputs[i], return_tensors="pt", add_special_tokens=False)
                with torch.inference_mode():
                    out = model.generate(**ids, max_new_tokens=counts[i], do_sample=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                assert out.shape[1] - ids["input_ids"].shape[1] == counts[i]

            def api(i):
                body = chat(client, prompts[i], max_tokens=args.max_tokens, temperature=0)
                assert body["usage"]["completion_tokens"] == counts[i]

            api_s = direct_s = 0.0
            for r in range(args.rounds):
                for i in range(len(prompts)):
                    for side in ((api, direct) if (r + i) % 2 == 0 else (direct, api)):
                        start = time.perf_counter()
                        side(i)
                        took = time.perf_counter() - start
                        if side is api:
                            api_s += took
                        else:
                            direct_s += took
            api_s, direct_s = api_s / args.rounds, direct_s / args.rounds

            # 2. time to first streamed token
            ttft = [first_token_ms(client, p, args.max_tokens) for p in prompts[:20]]

            # 3. throughput with concurrent clients
            levels = []
            for workers in (1, 4, 8):
                jobs = [prompts[i % len(prompts)] for i in range(args.requests)]

                def one(prompt):
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
                        t = time.perf_counter()
                        body = chat(c, prompt, max_tokens=args.max_tokens, temperature=1.0)
                        return time.perf_counter() - t, body["usage"]["completion_tokens"]

                start = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(one, jobs))
                wall = time.perf_counter() - start
                lat = sorted(r[0] for r in results)
                levels.append([workers, f"{len(jobs) / wall:.2f}", f"{sum(r[1] for r in results) / wall:.0f}",
                               f"{statistics.median(lat) * 1000:.0f}", f"{lat[int(0.95 * (len(lat) - 1))] * 1000:.0f}"])
                print(f"{workers} clients: {len(jobs) / wall:.2f} req/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ratio = api_s / direct_s
    body = table(["path", f"40 prompts, greedy, same tokens (mean of {args.rounds} interleaved rounds)", "per request"], [
        ["`model.generate` in process", f"{direct_s:.2f} s", f"{direct_s / len(prompts) * 1000:.1f} ms"],
        ["`POST /v1/chat/completions` (server process, HTTP, logging to SQLite)", f"{api_s:.2f} s",
         f"{api_s / len(prompts) * 1000:.1f} ms"],
    ])
    body += (f"\n\nServing overhead ratio: **{ratio:.2f}** (goal: at most 1.10). "
             f"{sum(counts)} completion tokens in all, {statistics.mean(counts):.1f} a reply.\n\n")
    body += (f"Time to first streamed token (20 prompts): median {statistics.median(ttft):.0f} ms, "
             f"max {max(ttft):.0f} ms.\n\n")
    body += table(["concurrent clients", "requests/s", "tokens/s", "p50 latency ms", "p95 latency ms"], levels)
    body += (f"\n\n{args.requests} requests per level, max_tokens {args.max_tokens}, temperature 1. "
             "Requests take turns on the one model (see README, Serving); more clients only overlap the HTTP "
             "and logging work with generation, so throughput rises a little and latency grows with the queue.")
    print(body)
    if not args.no_write:
        write_section("serving", "Serving: overhead, time to first token, throughput (starter model)",
                      "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
