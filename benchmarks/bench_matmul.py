"""What a batch can gain on this machine, and what the weights' layout does.

1. The time of one projection of the Qwen2.5-0.5B shape (896 -> 4864, and
   the 151,936-word output layer) for 1, 8 and 32 rows, with the weight as
   `torch.nn.Linear` keeps it (``[out, in]``, read through a transposed
   view) and laid out ``[in, out]`` (`chatbot.cpu`). A decode step is
   mostly such products, so a step of 8 rows costs about what this says 8
   rows cost against one: that bounds what continuous batching can gain over
   one request at a time here (see the "Serving" section).
2. One greedy decode step of the whole Qwen2.5-0.5B-shaped model (random
   weights) at 1 and 8 rows, in both layouts, and whether they write the
   same tokens.

    python benchmarks/bench_matmul.py [--data-dir /work/cache]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def median_time(fn, runs: int = 7, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        timings.append((time.perf_counter() - start) / repeat)
    return sorted(timings)[runs // 2]


def projections() -> str:
    import torch

    torch.manual_seed(0)
    rows = []
    for name, out_features in (("896 -> 4864 (MLP)", 4864), ("896 -> 151,936 (output layer)", 151936)):
        weight = torch.randn(out_features, 896)
        laid_out = weight.t().contiguous().t()  # the same matrix, stored [in, out]
        base, repeat = None, 100 if out_features < 10000 else 4
        for m in (1, 8, 32):
            x = torch.randn(m, 896)
            with torch.inference_mode():
                plain = median_time(lambda: torch.nn.functional.linear(x, weight), repeat=repeat)
                ours = median_time(lambda: torch.nn.functional.linear(x, laid_out), repeat=repeat)
            base = base or plain
            rows.append([name, m, f"{plain * 1e3:.3f}", f"{plain / base:.2f}", f"{m * base / plain:.2f}",
                         f"{ours * 1e3:.3f}", f"{plain / ours:.2f}x"])
    return table(["projection", "rows", "ms, [out, in]", "time against 1 row", "most a batch can gain (rows / time)",
                  "ms, [in, out]", "[in, out] faster by"], rows)


def decode_steps(model_dir: Path, steps: int = 12) -> tuple[str, list]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from chatbot.cpu import transpose_for_decoding

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def step_time(batch: int):
        torch.manual_seed(1)
        prompt = 16
        ids = torch.randint(10, 1000, (batch, prompt))
        tokens = []
        with torch.inference_mode():
            cache = DynamicCache()
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            mask = torch.ones(batch, prompt, dtype=torch.long)
            start = time.perf_counter()
            for i in range(steps):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                out = model(input_ids=token, attention_mask=mask, position_ids=torch.full((batch, 1), prompt + i),
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
            took = (time.perf_counter() - start) / steps
        return took, torch.cat(tokens, 1)

    plain = {b: step_time(b) for b in (1, 8)}
    changed = transpose_for_decoding(model)
    ours = {b: step_time(b) for b in (1, 8)}
    rows = [[b, f"{plain[b][0] * 1e3:.0f}", f"{ours[b][0] * 1e3:.0f}", f"{plain[b][0] / ours[b][0]:.2f}x",
             "yes" if torch.equal(plain[b][1], ours[b][1]) else "**no**"] for b in (1, 8)]
    body = table(["rows", "ms per step, [out, in]", "ms per step, [in, out]", "faster by", "same greedy tokens"],
                 rows)
    return body + f"\n\n{changed} weights laid out [in, out]; {steps} steps after a 16-token prompt.", rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the Qwen2.5-0.5B shape is built (bench_serving)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from benchmarks.bench_serving import qwen_shaped
    from chatbot.models import resolve_model_path

    body = projections()
    body += (f"\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32. A batch of n rows can "
             "serve at most n / (its time against 1 row) times the tokens of one request at a time.\n\n")
    model_dir = qwen_shaped(Path(args.data_dir), Path(resolve_model_path("starter", args.data_dir)))
    steps, _ = decode_steps(model_dir)
    body += "**One decode step of the Qwen2.5-0.5B shape** (greedy, KV cache)\n\n" + steps
    print(body)
    if not args.no_write:
        write_section("matmul", "What a batch can gain on this CPU, and the weights' layout",
                      "python benchmarks/bench_matmul.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
