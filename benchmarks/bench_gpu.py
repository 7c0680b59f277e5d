"""On a GPU: decode speed against the memory-bandwidth bound, one PPO cycle of
256 rollouts, and hot-swap time, on a model with the shape of
Qwen2.5-0.5B built from its config (random weights: speed does not depend
on what the weights say).

- **Decode**: greedy generation at batch 1 through the serving `Policy`,
  tokens per second; the bound is the measured device memory bandwidth
  (a large on-device copy) divided by the bytes read per token (every weight
  once, plus the KV cache).
- **PPO**: `online_rl.ppo.PPOTrainer` for `--ppo-steps` steps of 256
  rollouts against a scripted reward (reply length), wall time and peak
  GPU memory.
- **Hot-swap**: `Policy.swap_to` between two LoRA adapters (r=16, every
  projection), 20 swaps.

    python benchmarks/bench_gpu.py [--device cuda:0] [--ppo-steps 2]

`--small --device cpu` runs the same code on a tiny model, to check the
script itself where there is no GPU; it writes nothing.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ppo-steps", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
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
    policy = Policy(loaded)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0)
    model.generation_config.eos_token_id = None  # random weights: decode the full length
    policy.generate([{"role": "user", "content": "warm up"}], settings)
    runs = []
    for i in range(5):
        sync(device)
        result = policy.generate([{"role": "user", "content": f"hello number {i}"}], settings)
        runs.append(result.completion_tokens / (result.latency_ms / 1000))
    tps = statistics.median(runs)
    bw = bandwidth_gbs(device)
    kv_bytes = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * (
        shape["hidden_size"] // shape["num_attention_heads"]) * 2 * args.new_tokens
    bound = bw * 1e9 / (weight_bytes + kv_bytes)
    log(f"decode: {tps:.0f} tokens/s, bound {bound:.0f} tokens/s at {bw:.0f} GB/s measured")

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
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    paths = [make_adapter(model, work / f"v{i}", i, loaded.name) for i in (1, 2)]
    swaps = swap_times(LoadedModel(model, tokenizer, loaded.name, loaded.path, device, dtype), paths, 20)
    swap_ms = statistics.median(swaps["total_ms"])
    log(f"hot-swap: median {swap_ms:.0f} ms")

    body = f"""
Model: {name} built from its config ({params / 1e6:.0f}M parameters, {dtype}, random weights) on {gpu}.

{table(["measure", "value"], [
    ["decode, batch 1, greedy, {0} new tokens".format(args.new_tokens), f"{tps:.0f} tokens/s"],
    ["memory-bandwidth bound (measured copy bandwidth {0:.0f} GB/s / {1:.2f} GiB read per token)".format(
        bw, (weight_bytes + kv_bytes) / 2**30), f"{bound:.0f} tokens/s ({tps / bound:.0%} of it)"],
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
