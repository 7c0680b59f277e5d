"""On a GPU: decode speed against the memory-bandwidth bound, one PPO cycle of
256 rollouts, and hot-swap time, on a model with the shape of
Qwen2.5-0.5B built from its config (random weights: speed does not depend
on what the weights say).

- **Decode**: greedy replies of `--new-tokens` tokens through the serving
  `Policy` (the continuous-batching engine) with 1, 8, 32 and 128 clients
  at once, on the base (v0) and on a LoRA version, beside transformers'
  `generate` on the same batch of prompts; tokens per second against the
  memory-bandwidth bound: the measured device bandwidth (a large on-device
  copy) divided by the bytes a decode step reads (every weight once, plus
  each row's KV cache), times the rows of the step.
- **PPO**: `online_rl.ppo.PPOTrainer` for `--ppo-steps` steps of 256
  rollouts against a scripted reward (reply length), wall time and peak
  GPU memory.
- **Hot-swap**: `Policy.swap_to` between two LoRA adapters (r=16, every
  projection), 20 swaps.

    python benchmarks/bench_gpu.py [--device cuda:0] [--ppo-steps 2] [--clients 1,8,32,128]

`--small --device cpu` runs the same code on a tiny model, to check the
script itself where there is no GPU; it writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_operations import QWEN_05B, make_adapter, swap_times  # noqa: E402
from benchmarks.report import table, write_section  # noqa: E402

SMALL = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bandwidth_gbs(device) -> float:
    import torch

    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    started = time.perf_counter()
    n = 20
    for _ in range(n):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * n / (time.perf_counter() - started) / 1e9  # read + write


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clients_decode(policy, clients: int, new_tokens: int, each: int, within_base: bool = True) -> dict:
    """`clients` threads at once, each asking `each` greedy replies of
    `new_tokens` tokens through `policy`: tokens per second over the wall
    time, p50 reply latency and time to first token."""
    import threading

    from chatbot.policy import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0, within_base=within_base)
    results, errors = [], []

    def client(i: int) -> None:
        for k in range(each):
            try:
                results.append(policy.generate([{"role": "user", "content": f"hello number {i} {k}"}], settings))
            except Exception as exc:  # noqa: BLE001 - counted and shown, not hidden
                errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients * each} requests failed: {errors[0]}")
    return {"tps": sum(r.completion_tokens for r in results) / wall,
            "p50_s": statistics.median(r.latency_ms for r in results) / 1000,
            "ttft_ms": statistics.median(r.first_token_ms for r in results)}


def generate_decode(model, tokenizer, rows: int, new_tokens: int, device) -> float:
    """transformers' `generate` on `rows` prompts in one left-padded batch,
    greedy: tokens per second (after one warm-up call)."""
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"hello number {i}"}], tokenize=False,
                                           add_generation_prompt=True) for i in range(rows)]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        sync(device)
        started = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        sync(device)
    return (out.shape[1] - batch["input_ids"].shape[1]) * rows / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ppo-steps", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", default="1,8,32,128", help="clients at once, comma-separated")
    parser.add_argument("--small", action="store_true", help="a tiny model: check the script on the CPU")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from chatbot.models import LoadedModel, default_dtype, load_tokenizer, resolve_device
    from chatbot.policy import GenerationSettings, Policy
    from online_rl.ppo import PPOConfig, PPOTrainer, add_lora

    device = resolve_device(args.device)
    dtype = default_dtype(device)
    shape = SMALL if args.small else QWEN_05B
    tokenizer = load_tokenizer(str(ROOT / "data" / "models" / "starter")) if (ROOT / "data/models/starter").exists() \
        else None
    if tokenizer is None:
        from chatbot.models import resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path("starter", ROOT / "data", build_progress=log))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = LoadedModel(model, tokenizer, "qwen2.5-0.5b-shape", "qwen2.5-0.5b-shape", device, dtype)
    name = "qwen2.5-0.5b-shape" if not args.small else "tiny"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"{name}: {params / 1e6:.0f}M parameters, {weight_bytes / 2**30:.2f} GiB in {dtype} on {gpu}")

    # -- decode ---------------------------------------------------------------------
    model.generation_config.eos_token_id = None  # random weights: decode the full length
    levels = [int(c) for c in args.clients.split(",")]
    bw = bandwidth_gbs(device)
    kv_row = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * (
        shape["hidden_size"] // shape["num_attention_heads"]) * torch.finfo(dtype).bits // 8 * args.new_tokens
    log(f"copy bandwidth {bw:.0f} GB/s; weights {weight_bytes / 2**30:.2f} GiB, KV {kv_row / 2**20:.1f} MiB a row")
    raw = {clients: generate_decode(model, tokenizer, clients, args.new_tokens, device) for clients in levels}
    for clients, tps in raw.items():
        log(f"generate x{clients}: {tps:.0f} tokens/s")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    adapter = make_adapter(model, work / "v1", 1, loaded.name)
    decode_rows = []
    for version in ("v0", "v1", "v1 free"):
        # v1 on a copy of the base: the PPO cycle below starts from a plain model.
        # "v1 free": the same adapter without its shadow rows (--no-within-base).
        served = loaded if version == "v0" else dataclasses.replace(loaded, model=copy.deepcopy(model))
        policy = Policy(served, max_batch=max(levels), max_waiting=2 * max(levels))
        policy.engine.eos_id = None  # random weights: every reply runs its full length
        if version != "v0":
            policy.swap_to("v1", str(adapter))
        clients_decode(policy, 1, 16, 1)  # warm-up: first kernels, allocator
        for clients in levels:
            try:
                got = clients_decode(policy, clients, args.new_tokens, max(1, 4 // clients),
                                     within_base=version != "v1 free")
            except RuntimeError as exc:  # shown in the table, and the other measures still run
                log(f"{version} x{clients}: {exc}")
                got = {"tps": float("nan"), "p50_s": float("nan"), "ttft_ms": float("nan")}
            bound = clients * bw * 1e9 / (weight_bytes + clients * kv_row)
            got.update(version=version, clients=clients, bound=bound)
            log(f"{version} x{clients}: {got['tps']:.0f} tokens/s (bound {bound:.0f}), "
                f"p50 {got['p50_s']:.2f} s, ttft p50 {got['ttft_ms']:.0f} ms")
            decode_rows.append(got)
        del policy, served

    # -- one PPO cycle of 256 rollouts -------------------------------------------------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = PPOConfig(steps=args.ppo_steps, prompts_per_step=max(1, args.rollouts // 4), samples_per_prompt=4,
                       minibatch=32)
    rollout_settings = GenerationSettings(max_new_tokens=64, temperature=0.8, top_p=0.95)
    trainer = PPOTrainer(add_lora(model, config), tokenizer, config, rollout_settings, progress=log)
    prompts = [[{"role": "user", "content": f"question {i}?"}] for i in range(512)]
    started = time.perf_counter()
    trainer.train(prompts, lambda prompts, replies: [min(len(r), 200) / 200 for r in replies])
    sync(device)
    ppo_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    model = trainer.unwrapped.policy.unload().eval()
    log(f"ppo: {args.ppo_steps} steps of {args.rollouts} rollouts in {ppo_s:.1f} s, peak {peak:.1f} GiB")

    # -- hot-swap -----------------------------------------------------------------------
    paths = [make_adapter(model, work / f"v{i}", i, loaded.name) for i in (1, 2)]
    swaps = swap_times(LoadedModel(model, tokenizer, loaded.name, loaded.path, device, dtype), paths, 20)
    swap_ms = statistics.median(swaps["total_ms"])
    log(f"hot-swap: median {swap_ms:.0f} ms")

    body = f"""
Model: {name} built from its config ({params / 1e6:.0f}M parameters, {dtype}, random weights) on {gpu}.

{table(["clients", "version", "tokens/s", "bound", "of the bound", "generate, same batch", "p50 reply",
        "time to first token p50"], [
    [r["clients"], r["version"], f"{r['tps']:.0f}", f"{r['bound']:.0f}", f"{r['tps'] / r['bound']:.1%}",
     f"{raw[r['clients']]:.0f}" if r["version"] == "v0" else "", f"{r['p50_s']:.2f} s", f"{r['ttft_ms']:.0f} ms"]
    for r in decode_rows])}

Greedy replies of {args.new_tokens} tokens (no end token: random weights), all clients at once; one client
asks 4 times in a row, more ask once each. Bound: {bw:.0f} GB/s measured copy bandwidth / (weights
{weight_bytes / 2**30:.2f} GiB + {kv_row / 2**20:.1f} MiB of KV cache a row) x rows. v1: a LoRA of rank 16 on
every projection, served through the same engine. `generate`: transformers' `generate` on the same prompts,
left-padded, one static batch. v1 serves within the base's words (a shadow row on the base beside
each reply, docs/serving.md); "v1 free" is the same adapter with `--no-within-base`.

{table(["measure", "value"], [
    [f"PPO: {args.ppo_steps} steps of {args.rollouts} rollouts (64 new tokens, minibatch 32)",
     f"{ppo_s:.1f} s, {ppo_s / args.ppo_steps:.1f} s a step, peak {peak:.1f} GiB"],
    ["hot-swap, 20 swaps, median (max)", f"{swap_ms:.0f} ms ({max(swaps['total_ms']):.0f} ms)"],
])}
"""
    print(body)
    if not args.small:
        write_section("gpu", "On a GPU: decode speed, one PPO cycle, hot-swap",
                      f"python benchmarks/bench_gpu.py --device {args.device} --ppo-steps {args.ppo_steps}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
