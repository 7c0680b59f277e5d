"""Always-learning operations: hot-swap time, chat latency during swaps, and
chat latency while a retrain runs.

1. **Hot-swap time** (`Policy.swap_to`: read the adapter's files, then add
   it between two decode steps; the adapter it replaces is deleted once no
   reply uses it), alternating between two
   adapters, on the starter model and on a model with the shape of
   Qwen2.5-0.5B built from a config (random weights; LoRA r=16 on every
   projection, the PPO default).
2. **Latency during swaps**: the starter served over HTTP (in this process,
   as `app.py serve` does), `--clients` clients sending chat requests back to
   back. Windows without swaps and windows with a promotion every
   `--swap-every` seconds alternate, 20 swaps in all; each swap goes through
   the database (`Store.promote`) and the server's `VersionFollower`, the
   production path. Baseline: the same load, same run, no swaps.
3. **Latency during a retrain**: the same load while the scheduler's
   training process (`app.py retrain`, PPO on simulated thumbs, its threads
   limited and its priority lowered) runs, against idle windows before and
   after it, same run.

    python benchmarks/bench_operations.py [--clients 2] [--big/--no-big]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import percentile, table, write_section  # noqa: E402

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                tie_word_embeddings=True, rope_theta=1000000.0)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def make_adapter(model, out: Path, seed: int, base_model: str, scale: float = 0.02) -> Path:
    """A LoRA as PPO makes it (r=16, every projection), with random weights
    (normal, standard deviation `scale`: 0 leaves the base's replies as they are)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from online_rl.ppo import PPOConfig

    config = PPOConfig()
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                            target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    peft.save_pretrained(out)
    (out / "adapter.json").write_text(json.dumps({"version": out.name, "base_model": base_model}))
    peft.unload()
    return out


def swap_times(loaded, paths: list[Path], swaps: int) -> dict:
    from chatbot.policy import Policy

    policy = Policy(loaded)
    policy.swap_to("v1", str(paths[0]))  # the first wrap of the base is not a swap between versions
    records = [policy.swap_to(f"v{(i + 1) % 2 + 1}", str(paths[(i + 1) % 2])) for i in range(swaps)]
    size = sum(p.stat().st_size for p in paths[0].glob("*.safetensors")) / 2**20
    return {"read_ms": [r["read_s"] * 1000 for r in records], "switch_ms": [r["switch_s"] * 1000 for r in records],
            "total_ms": [r["total_s"] * 1000 for r in records], "adapter_mb": round(size, 2)}


def bench_swap_time(starter: Path, work: Path, big: bool, swaps: int) -> list[list]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from chatbot.models import LoadedModel, load_model

    rows = []
    loaded = load_model(str(starter), work, device="cpu")
    paths = [make_adapter(load_model(str(starter), work, device="cpu").model, work / f"starter-v{i}", i, str(starter))
             for i in (1, 2)]
    rows.append(("starter", sum(p.numel() for p in loaded.model.parameters()), swap_times(loaded, paths, swaps)))
    if big:
        log("building a Qwen2.5-0.5B-shaped model from its config (random weights)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_05B), dtype=torch.float32).eval()
        name = "qwen2.5-0.5b-shape"
        paths = [make_adapter(model, work / f"qwen-v{i}", i, name) for i in (1, 2)]
        big_loaded = LoadedModel(model, loaded.tokenizer, name, name, torch.device("cpu"), torch.float32)
        rows.append((name, sum(p.numel() for p in model.parameters()), swap_times(big_loaded, paths, swaps)))
        del model, big_loaded
    out = []
    for name, params, t in rows:
        out.append([name, f"{params / 1e6:,.1f}M", t["adapter_mb"], swaps,
                    f"{statistics.median(t['read_ms']):.1f}", f"{statistics.median(t['switch_ms']):.1f}",
                    f"{statistics.median(t['total_ms']):.1f}", f"{max(t['total_ms']):.1f}"])
        log(f"swap time {name}: median {out[-1][6]} ms, max {out[-1][7]} ms")
    return out


class Load:
    """`clients` threads sending chat requests back to back; each result is
    tagged with the window (phase) it started in."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.url, self.clients, self.max_tokens = url, clients, max_tokens
        self.phase = "warmup"
        self.results: list[tuple[str, float, bool, str]] = []  # phase, latency ms, ok, version
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, worker: int) -> None:
        import httpx

        prompts = ["hello", "how are you", "what do you like to do", "tell me about yourself",
                   "do you like music", "what is your name"]
        with httpx.Client(base_url=self.url, timeout=120) as client:
            i = worker
            while not self._stop.is_set():
                phase, started = self.phase, time.perf_counter()
                try:
                    r = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                        "max_tokens": self.max_tokens, "temperature": 0.8})
                    ok, version = r.status_code == 200, r.json().get("model", "?") if r.status_code == 200 else "?"
                except Exception:  # noqa: BLE001 - a failed request is a figure
                    ok, version = False, "?"
                self.results.append((phase, (time.perf_counter() - started) * 1000, ok, version))
                i += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def summary(self, phase: str) -> dict:
        rows = [r for r in self.results if r[0] == phase]
        ok = [r[1] for r in rows if r[2]]
        return {"requests": len(rows), "failed": sum(not r[2] for r in rows), "p50": percentile(ok, 0.5),
                "p99": percentile(ok, 0.99), "mean": statistics.fmean(ok) if ok else float("nan"),
                "versions": sorted({r[3] for r in rows})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window", type=float, default=15.0, help="seconds per window of the swap comparison")
    parser.add_argument("--swap-every", type=float, default=1.5)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of each idle window around the retrain")
    parser.add_argument("--feedback", type=int, default=300, help="simulated thumbs for the retrain")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the swap on a Qwen2.5-0.5B-shaped model")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from benchmarks.bench_retrain import fill
    from chatbot.admin import Operations
    from chatbot.models import load_model, resolve_model_path
    from chatbot.policy import GenerationSettings, Policy
    from chatbot.server import BackgroundServer, create_app
    from chatbot.swap import VersionFollower
    from chatbot.ui import ChatOptions
    from online_rl.scheduler import RetrainScheduler, ScheduleConfig
    from storage import Store

    starter = Path(resolve_model_path("starter", ROOT / "data", build_progress=log))
    work = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    log(f"scratch directory {work}")

    swap_rows = bench_swap_time(starter, work, args.big, swaps=20)

    # -- a served starter, as app.py serve runs it ------------------------------------
    data_dir = work / "data"
    log(f"filling the database with {args.feedback} simulated thumbs")
    fill(data_dir, starter, args.feedback, seed=0)
    store = Store.in_data_dir(data_dir)
    for i in (1, 2):
        path = make_adapter(load_model(str(starter), work, device="cpu").model, data_dir / "adapters" / f"v{i}", i,
                            str(starter))
        store.register_adapter(f"v{i}", path=str(path), base_model=str(starter))
    policy = Policy(load_model(str(starter), work, device="cpu"))
    follower = VersionFollower(policy, store, interval_s=0.5)
    follower.sync()

    def command(method, threads):
        return [sys.executable, str(ROOT / "app.py"), "retrain", "--data-dir", str(data_dir), "--model", str(starter),
                "--device", "cpu", "--method", method, "--threads", str(threads), "--no-promote"]

    config = ScheduleConfig(every_s=0)
    scheduler = RetrainScheduler(store, command, config, log_dir=data_dir / "logs")
    options = ChatOptions(defaults=GenerationSettings(max_new_tokens=args.max_tokens))
    app = create_app(policy, store, options, ops=Operations(store, follower, scheduler), admin_token=None)
    follower.start()
    store.promote("v1")  # every window serves an adapter, so that only the swaps differ
    follower.sync()
    with BackgroundServer(app) as server, Load(server.url, args.clients, args.max_tokens) as load:
        time.sleep(3)
        # -- swaps against no swaps, alternating windows -------------------------------
        swaps, versions = 0, ["v2", "v1"]  # v1 serves at the start: every promotion is a swap
        for window in range(4):
            load.phase = "swaps" if window % 2 else "no swaps"
            log(f"window {window + 1}/4: {load.phase}")
            end = time.monotonic() + args.window
            while time.monotonic() < end:
                time.sleep(args.swap_every)
                if load.phase == "swaps" and swaps < 20:
                    store.promote(versions[swaps % 2])
                    swaps += 1
        load.phase = "settle"
        time.sleep(1.0)
        swap_count = sum(1 for s in follower.swaps if s["previous"] != "v0")

        # -- a retrain against idle --------------------------------------------------------
        store.promote("v0")  # the retrain comparison serves the base, as a first retrain would
        time.sleep(1.0)
        load.phase = "idle"
        log(f"idle window ({args.idle:.0f} s)")
        time.sleep(args.idle)
        started = scheduler.retrain_now("ppo")
        load.phase = "retrain"
        t0 = time.perf_counter()
        log(f"retrain running (pid {started['pid']}, {config.training_threads()} torch thread(s), nice {config.nice})")
        code = scheduler.wait_for_child(1800)
        retrain_s = time.perf_counter() - t0
        load.phase = "idle"
        log(f"retrain ended with code {code} after {retrain_s:.0f} s; idle window ({args.idle:.0f} s)")
        time.sleep(args.idle)
        load.phase = "done"
    follower.stop()
    run = store.runs(1)[0]

    figures = {p: load.summary(p) for p in ("no swaps", "swaps", "idle", "retrain")}
    for phase, f in figures.items():
        log(f"{phase}: {f}")
    lat_rows = [[phase, f["requests"], f["failed"], f"{f['p50']:.0f}", f"{f['p99']:.0f}", f"{f['mean']:.0f}",
                 ", ".join(f["versions"])] for phase, f in figures.items()]
    ratio = lambda a, b, k: figures[a][k] / figures[b][k]  # noqa: E731
    body = f"""
### Hot-swap time

`Policy.swap_to` alternating between two adapters, 20 swaps after a first load; read = the adapter's files
(before the engine is held), switch = add beside the others and make it the version new requests start on (between
two decode steps; the one it replaces is deleted once no reply uses it), total = both.

{table(["model", "parameters", "adapter MB", "swaps", "read ms (median)", "switch ms (median)",
        "total ms (median)", "total ms (max)"], swap_rows)}

### Chat latency during 20 swaps, and during a retrain

The starter served over HTTP in one process with the version follower polling the registry every 0.5 s;
{args.clients} clients send chat requests back to back (up to {args.max_tokens} new tokens, temperature 0.8).
Windows of {args.window:.0f} s with no swaps and with a promotion in the database every {args.swap_every} s
alternate ({swap_count} swaps in all). Then idle windows of {args.idle:.0f} s before and after one PPO retrain
({args.feedback} simulated thumbs) in the scheduler's training process: {config.training_threads()} torch
thread(s) of {__import__('os').cpu_count()} cores, nice {config.nice}; it took {retrain_s:.0f} s and ended
{run['status']}. Latencies are per request, in milliseconds, over requests that succeeded.

{table(["window", "requests", "failed", "p50 ms", "p99 ms", "mean ms", "versions that answered"], lat_rows)}

- The no-swap windows serve v1 or v2 like the swap windows, so only the swaps differ between them. The
  idle and retrain windows serve the base, v0: on a model this small an unmerged LoRA on every projection
  is a large share of the compute, so compare windows within a pair, not across pairs.
- Swaps against none: p50 x{ratio('swaps', 'no swaps', 'p50'):.2f}, p99 x{ratio('swaps', 'no swaps', 'p99'):.2f};
  failed requests: {figures['swaps']['failed'] + figures['no swaps']['failed']}.
- Retrain against idle: p50 x{ratio('retrain', 'idle', 'p50'):.2f}, p99 x{ratio('retrain', 'idle', 'p99'):.2f};
  failed requests: {figures['retrain']['failed'] + figures['idle']['failed']}.
"""
    print(body)
    if not args.no_write:
        write_section("operations", "Operations: hot-swap and chat latency while learning (CPU)",
                      "python benchmarks/bench_operations.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
