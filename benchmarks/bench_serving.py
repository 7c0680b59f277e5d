"""Serving many people at once: our continuous batching, side by side with the
one-at-a-time path and `transformers serve --continuous-batching`.

For each model (--models): the starter, and a Qwen2.5-0.5B-shaped model built
from its config (random weights; a tokenizer of Qwen's 151,936 tokens, each
a word, so that the output layer costs what Qwen's does and a reply streams
word by word), four servers take turns on the same prompts:

- **ours, batched** (`app.py serve --max-batch 32`) on v0, the base;
- **ours, batched, on an adapter**: v1, a LoRA of rank 16 on every
  projection, promoted before the server starts;
- **ours, one at a time** (`--max-batch 1`) on v0;
- **the peer**: `transformers serve --continuous-batching` on the base.

Each serves 1, 8 and 32 concurrent clients, each client streaming greedy
replies of up to --max-tokens tokens: requests/s, tokens/s (every reply
re-tokenized with the model's tokenizer, the same count for every server),
p50/p99 latency, p50 time to first token, failures.

On the starter also:

- **overhead** for one client: ours against `model.generate` in this
  process, same prompts and token counts, interleaved request by request;
- **promotions**: 8 clients chat while the operator API promotes v1 and v2
  in turn --promotions times, against windows without: failures and p99.

    python benchmarks/bench_serving.py --data-dir /work/cache [--models starter,qwen0.5b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_operations import make_adapter  # noqa: E402
from benchmarks.report import percentile, table, write_section  # noqa: E402

TOKEN = "bench-serving-admin-token"
# The adapter served without its shadow rows (`--no-within-base`): what
# keeping a version within its base's words costs (docs/serving.md).
FREE = "ours, batched, v1 (adapter), --no-within-base"
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- models ------------------------------------------------------------------------


def qwen_shaped(cache: Path, starter_dir: Path) -> Path:
    """A Qwen2.5-0.5B-shaped model with random weights, built once."""
    out = cache / "models" / "bench-qwen2.5-0.5b-shape"
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    starter = AutoTokenizer.from_pretrained(starter_dir)
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|unk|>"]
    # "Ġ" is a space to the byte-level decoder transformers gives a Qwen2 model's tokenizer, whatever
    # tokenizer.json says: every token decodes as " w123", so replies are words that stream one by one.
    words = [f"\u0120w{i}" for i in range(QWEN_05B["vocab_size"] - len(specials))]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>",
                                   unk_token="<|unk|>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = starter.chat_template
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN_05B, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(out)
    return out


# -- servers -----------------------------------------------------------------------


class Server:
    """A server process: ours (`app.py serve`) or the peer (`transformers serve`)."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, model: str, log_path: Path):
        self.name, self.command, self.port, self.ready_path, self.model = name, command, port, ready_path, model
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def ours(name: str, model_dir: Path, data_dir: Path, batch: int, log_path: Path, extra: tuple = ()) -> Server:
    port = free_port()
    return Server(name, [sys.executable, str(ROOT / "app.py"), "serve", "--data-dir", str(data_dir), "--model",
                         str(model_dir), "--device", "cpu", "--port", str(port), "--retrain-every", "0",
                         "--max-batch", str(batch), "--max-waiting", "64", "--admin-token", TOKEN,
                         "--follow-every", "0.5", *extra],
                  port, "/healthz", str(model_dir), log_path)


def peer(model_dir: Path, log_path: Path) -> Server:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    return Server("transformers serve --continuous-batching",
                  [str(exe), "serve", "--continuous-batching", "--device", "cpu", "--port", str(port),
                   "--host", "127.0.0.1", str(model_dir)],
                  port, "/health", str(model_dir), log_path)


# -- load ----------------------------------------------------------------------------


class ChatClient:
    """One simulated person: a keep-alive HTTP connection that streams chat
    replies. Plain `http.client` and one JSON parse per chunk: on this 2-core
    machine the clients share the cores with the server, and with httpx (a
    new client per request) 8 clients took half of both cores, more than the
    server they measured."""

    def __init__(self, server: Server, timeout: float = 600):
        self.server, self.timeout, self.connection = server, timeout, None

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def stream(self, prompt: str, max_tokens: int) -> tuple[str, float, float]:
        """(text, seconds to the first content, seconds in all) of one streamed greedy reply."""
        import http.client

        body = json.dumps({"model": self.server.model, "messages": [{"role": "user", "content": prompt}],
                           "stream": True, "max_tokens": max_tokens, "temperature": 0})
        start, first, text = time.perf_counter(), None, []
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=self.timeout)
        try:
            self.connection.request("POST", "/v1/chat/completions", body=body,
                                    headers={"Content-Type": "application/json"})
            response = self.connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
            for raw in iter(response.readline, b""):
                if not raw.startswith(b"data: {"):
                    continue
                chunk = json.loads(raw[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                content = (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
            response.read()  # the rest of the body, so that the connection can be used again
        except BaseException:
            self.close()
            raise
        end = time.perf_counter()
        return "".join(text), (first or end) - start, end - start


def load(server: Server, prompts: list[str], clients: int, requests: int, max_tokens: int, count_tokens) -> dict:
    """`clients` people, each on a connection of their own, sending `requests` in all back to back."""
    jobs = iter([prompts[i % len(prompts)] for i in range(requests)])
    lock = threading.Lock()
    results, failures = [], []

    def person():
        with ChatClient(server) as client:
            while True:
                with lock:
                    prompt = next(jobs, None)
                if prompt is None:
                    return
                try:
                    results.append(client.stream(prompt, max_tokens))
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(repr(exc))

    start = time.perf_counter()
    people = [threading.Thread(target=person) for _ in range(clients)]
    for p in people:
        p.start()
    for p in people:
        p.join()
    wall = time.perf_counter() - start
    latency = sorted(r[2] for r in results)
    first = sorted(r[1] for r in results)
    tokens = sum(count_tokens(r[0]) for r in results)
    return {"clients": clients, "requests": requests, "failed": len(failures), "wall_s": wall,
            "rps": len(results) / wall, "tps": tokens / wall, "tokens": tokens,
            "p50_ms": 1000 * percentile(latency, 0.5) if latency else float("nan"),
            "p99_ms": 1000 * percentile(latency, 0.99) if latency else float("nan"),
            "ttft_ms": 1000 * percentile(first, 0.5) if first else float("nan"), "errors": failures[:3]}


# -- the runs --------------------------------------------------------------------------


def bench_model(label: str, model_dir: Path, work: Path, args, prompts: list[str]) -> dict:
    from transformers import AutoTokenizer

    from storage import Store

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def count_tokens(text: str) -> int:
        if label != "starter":  # each of the shape's tokens decodes as one word (see `qwen_shaped`)
            return len(text.split())
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    data = work / f"data-{label}"
    store = Store.in_data_dir(data)
    for version, seed in (("v1", 1), ("v2", 2)):
        from transformers import AutoModelForCausalLM

        path = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), data / "adapters" / version, seed,
                            str(model_dir))
        store.register_adapter(version, path=str(path), base_model=str(model_dir))
    store.close()
    runs = {}
    plan = [("ours, batched, v0", "v0", args.max_batch, ()),
            ("ours, batched, v1 (adapter)", "v1", args.max_batch, ()),
            (FREE, "v1", args.max_batch, ("--no-within-base",)),
            ("ours, one at a time, v0", "v0", 1, ()), ("transformers serve --continuous-batching", None, None, ())]
    for name, version, batch, extra in plan:
        if version is not None:
            store = Store.in_data_dir(data)
            store.promote(version, actor="benchmark", reason="bench_serving")
            store.close()
            server = ours(name, model_dir, data, batch, work / f"{label}-{version}-{batch}{'-free' if extra else ''}.log",
                          extra)
        else:
            server = peer(model_dir, work / f"{label}-peer.log")
        log(f"{label}: starting {name}")
        with server:
            for p in prompts[:2]:  # warm up
                with ChatClient(server) as c:
                    c.stream(p, args.max_tokens)
            levels = []
            for clients in args.clients:
                requests = max(args.starter_requests if label == "starter" else args.requests, clients)
                result = load(server, prompts, clients, requests, args.max_tokens, count_tokens)
                log(f"{label}: {name}, {clients} clients: {result['rps']:.2f} req/s, {result['tps']:.1f} tok/s, "
                    f"p50 {result['p50_ms']:.0f} ms, failed {result['failed']} {result['errors']}")
                levels.append(result)
            runs[name] = levels
            if label == "starter" and version == "v0" and batch == args.max_batch:
                runs["_overhead"] = overhead(server, model_dir, prompts, args)
                runs["_promotions"] = promotions(server, prompts, args, count_tokens)
    return runs


def overhead(server: Server, model_dir: Path, prompts: list[str], args) -> dict:
    """One client: ours against `model.generate` in this process, same tokens."""
    import torch

    from chatbot.models import load_model

    loaded = load_model(str(model_dir), model_dir.parent.parent, device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    client = httpx.Client(base_url=server.url, timeout=120)

    def api(prompt):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                      "max_tokens": args.max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    chosen = prompts[:40]
    counts = [api(p) for p in chosen]
    inputs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
              for p in chosen]

    def direct(i):
        ids = tok(inputs[i], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=counts[i], min_new_tokens=counts[i], do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    api_s = direct_s = 0.0
    for r in range(args.rounds):
        for i, prompt in enumerate(chosen):
            for side in ("api", "direct") if (r + i) % 2 == 0 else ("direct", "api"):
                start = time.perf_counter()
                api(prompt) if side == "api" else direct(i)
                took = time.perf_counter() - start
                api_s, direct_s = (api_s + took, direct_s) if side == "api" else (api_s, direct_s + took)
    client.close()
    log(f"overhead: api {api_s:.2f} s, direct {direct_s:.2f} s")
    return {"api_s": api_s / args.rounds, "direct_s": direct_s / args.rounds, "prompts": len(chosen),
            "tokens": sum(counts)}


def promotions(server: Server, prompts: list[str], args, count_tokens) -> dict:
    """8 clients chat; windows with promotions (v1, v2 in turn) alternate with windows without."""
    out = {"with": [], "without": [], "failed": 0, "promotions": 0, "swaps": []}
    stop = threading.Event()
    lock = threading.Lock()
    state = {"window": "without"}

    def client_loop(i: int) -> None:
        with ChatClient(server) as c:
            n = i
            while not stop.is_set():
                window = state["window"]
                try:
                    _, _, took = c.stream(prompts[n % len(prompts)], args.max_tokens)
                    with lock:
                        out[window].append(took)
                except Exception:  # noqa: BLE001 - counted
                    with lock:
                        out["failed"] += 1
                n += 8

    admin = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
    # Every window serves an adapter (v1, then v1 and v2 in turn), so that
    # only the promotions differ between the windows with and without them.
    r = admin.post("/v1/admin/promote", json={"version": "v1"})
    if r.status_code != 200:
        raise RuntimeError(f"promotion failed: {r.status_code} {r.text}")
    workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    per_window = max(1, args.promotions // 4)
    try:
        for window in range(8):
            state["window"] = "with" if window % 2 else "without"
            for k in range(per_window):
                time.sleep(args.promotion_every)
                if state["window"] == "with" and out["promotions"] < args.promotions:
                    version = "v2" if out["promotions"] % 2 == 0 else "v1"
                    r = admin.post("/v1/admin/promote", json={"version": version})
                    if r.status_code != 200:
                        raise RuntimeError(f"promotion failed: {r.status_code} {r.text}")
                    out["promotions"] += 1
                    out["swaps"].append(r.json().get("swap"))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=600)
        admin.post("/v1/admin/promote", json={"version": "v0"})
        admin.close()
    for key in ("with", "without"):
        lat = sorted(out[key])
        out[key] = {"requests": len(lat), "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99)}
    log(f"promotions: {out}")
    return out


def swap_summary(swaps: list[dict]) -> str:
    """How long the promotions held the batch (median and longest), from the server's own swap timings."""
    swaps = [s for s in swaps if s]
    if not swaps:
        return ""
    held = sorted(1000 * (s["wait_s"] + s["switch_s"]) for s in swaps)
    total = sorted(1000 * s["total_s"] for s in swaps)
    spare = sum(1 for s in swaps if s.get("into_spare"))
    return (f" Each swap held the batch {percentile(held, 0.5):.0f} ms at the median and {held[-1]:.0f} ms at the "
            f"longest (waiting for the step in progress, then switching to the spare adapter its weights were "
            f"copied into, {spare} of {len(swaps)} swaps, or adding the adapter), {percentile(total, 0.5):.0f} ms "
            "in all with reading and checking its files.")


def report(results: dict, args) -> str:
    parts = []
    for label, runs in results.items():
        rows = []
        for name, levels in runs.items():
            if name.startswith("_"):
                continue
            for r in levels:
                rows.append([name, r["clients"], r["requests"], r["failed"], f"{r['rps']:.2f}", f"{r['tps']:.1f}",
                             f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['ttft_ms']:.0f}"])
        when = f"Measured in an earlier run of this benchmark, {runs['_measured']}.\n\n" if runs.get("_kept") else ""
        parts.append(f"### {label}\n\n{when}" + table(["server", "clients", "requests", "failed", "requests/s", "tokens/s",
                                                    "p50 ms", "p99 ms", "p50 first token ms"], rows))
        by = {name: {r["clients"]: r for r in levels} for name, levels in runs.items() if not name.startswith("_")}
        ours_b, single = by["ours, batched, v0"], by["ours, one at a time, v0"]
        peer_runs, adapter = by["transformers serve --continuous-batching"], by["ours, batched, v1 (adapter)"]
        lines = []
        if 8 in ours_b:
            lines.append(f"At 8 clients ours does {ours_b[8]['tps']:.1f} tokens/s on v0 and {adapter[8]['tps']:.1f} "
                         f"on the adapter, against the peer's {peer_runs[8]['tps']:.1f} "
                         f"(**{ours_b[8]['tps'] / peer_runs[8]['tps']:.2f}x** on v0, "
                         f"{adapter[8]['tps'] / peer_runs[8]['tps']:.2f}x on the adapter; goal at least 1x) and "
                         f"**{ours_b[8]['tps'] / single[8]['tps']:.2f}x** the one-at-a-time path's "
                         f"{single[8]['tps']:.1f}.")
            if FREE in by and 8 in by[FREE]:
                free = by[FREE][8]
                lines.append(f"The adapter without its shadow rows (`--no-within-base`): {free['tps']:.1f} tokens/s "
                             f"at 8 clients; keeping it within the base's words costs "
                             f"{1 - adapter[8]['tps'] / free['tps']:.0%} of that.")
        if 1 in ours_b and 8 in ours_b:
            lines.append(f"p50 latency at 8 clients against one client: **{ours_b[8]['p50_ms'] / ours_b[1]['p50_ms']:.2f}x** "
                         f"(goal at most 2x; one at a time: {single[8]['p50_ms'] / single[1]['p50_ms']:.2f}x).")
        if 32 in ours_b:
            lines.append(f"32 clients: {ours_b[32]['failed']} failed on v0, {adapter[32]['failed']} on the adapter "
                         f"(goal 0).")
        parts.append(" ".join(lines))
        if "_overhead" in runs:
            o = runs["_overhead"]
            parts.append(f"Overhead for one client ({o['prompts']} prompts, greedy, {o['tokens']} tokens, mean of "
                         f"{args.rounds} interleaved rounds): `model.generate` in process {o['direct_s']:.2f} s, "
                         f"`POST /v1/chat/completions` (server process, HTTP, the engine, logging to SQLite) "
                         f"{o['api_s']:.2f} s: **{o['api_s'] / o['direct_s']:.2f}x** (goal at most 1.10).")
        if "_promotions" in runs:
            p = runs["_promotions"]
            parts.append(f"{p['promotions']} promotions (v2 and v1 in turn, through the operator API, after v1 was "
                         f"promoted before the first window, so that every window serves an adapter) while 8 clients "
                         f"chat: {p['failed']} failed requests; p99 {p['with']['p99_ms']:.0f} ms in the windows with "
                         f"promotions ({p['with']['requests']} requests) against {p['without']['p99_ms']:.0f} ms "
                         f"without ({p['without']['requests']}): **{p['with']['p99_ms'] / p['without']['p99_ms']:.2f}x** "
                         f"(goal at most 1.2x)." + swap_summary(p.get("swaps") or []))
    parts.append(f"Every client streams greedy replies of up to {args.max_tokens} tokens; tokens are counted by "
                 "re-tokenizing each reply with the model's tokenizer (the same count for every server; on the "
                 "Qwen shape, whose every token decodes as one word, by counting words). Servers run one at a time "
                 f"on this machine, {args.starter_requests} requests per level on the starter and "
                 f"{args.requests} on the Qwen shape, ours with `--max-batch {args.max_batch}` (batched) or 1. The Qwen2.5-0.5B "
                 "shape: hidden 896, 24 layers, 14 heads (2 for keys and values), vocabulary 151,936, random "
                 "weights, a tokenizer whose every token is a word (w123; transformers loads it as Qwen2's "
                 "byte-level tokenizer, which reads the prompts' own words as nothing, so every prompt is the chat "
                 "template's 3 tokens). The adapter: LoRA rank 16 on every projection, served "
                 "within the base's words (a shadow row on the base beside each reply) unless `--no-within-base` "
                 "says otherwise. On a GPU: the section below (`benchmarks/bench_gpu.py`).")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built there if missing)")
    parser.add_argument("--models", default="starter,qwen0.5b")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least the clients)")
    parser.add_argument("--starter-requests", type=int, default=320,
                        help="requests per level on the starter, whose replies take tens of milliseconds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the overhead comparison")
    parser.add_argument("--promotions", type=int, default=20)
    parser.add_argument("--promotion-every", type=float, default=1.0, help="seconds between promotions")
    parser.add_argument("--keep-other-models", action="store_true",
                        help="report the models not in --models as the last run measured them (saved results)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]

    from chatbot import starter
    from chatbot.models import resolve_model_path

    starter_dir = Path(resolve_model_path("starter", args.data_dir))
    prompts = sorted(starter.corpus_replies())[::25][:64]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        for label in args.models.split(","):
            model_dir = starter_dir if label == "starter" else qwen_shaped(Path(args.data_dir), starter_dir)
            results[label] = bench_model(label, model_dir, work, args, prompts)
            results[label]["_measured"] = time.strftime("%Y-%m-%d %H:%M")
    saved = ROOT / "benchmarks" / "results" / "serving.json"
    if args.keep_other_models and saved.exists():  # the models not run this time, as an earlier run measured them
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(saved.stat().st_mtime))
        for label, runs in json.loads(saved.read_text()).items():
            if label not in results:
                results[label] = {"_measured": written, **runs, "_kept": True}
    body = report(results, args)
    print(body)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({k: {n: v for n, v in r.items() if n != "_kept"} for k, r in results.items()},
                                indent=1, default=str))
    if not args.no_write:
        write_section("serving", "Serving many people at once: continuous batching beside the one-at-a-time path "
                      "and transformers serve", "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
