"""One decode step with rows on two LoRA adapters: peft's ``adapter_names=``
path against per-row LoRA scaling (`chatbot.lora_rows`), beside a step with
every row on one adapter, on the serving engine's settings (weights laid
out for decoding, one intra-op thread for a small model).

A batch holds two versions while a promotion's old replies finish and while
a canary runs; this is what each of its steps costs.

    python benchmarks/bench_mixed_batch.py [--data-dir /work/cache]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def step_times(model_dir: Path, rows: int, runs: int) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from peft.utils import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, DynamicCache

    from chatbot.cpu import decode_threads, transpose_for_decoding
    from chatbot.lora_rows import lora_layers, rows_on_adapters

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    transpose_for_decoding(base)
    torch.set_num_threads(decode_threads(base) or torch.get_num_threads())
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = PeftModel(base, config, adapter_name="a")
    model.add_adapter("b", config)
    for name in ("a", "b"):
        weights = {k: torch.randn_like(v) * 0.02 for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        set_peft_model_state_dict(model, weights, adapter_name=name)
    model.set_adapter("a")
    model.eval()
    layers = lora_layers(model)
    names = ["a"] * (rows // 2) + ["b"] * (rows - rows // 2)
    ids = torch.randint(3, base.config.vocab_size, (rows, 24))
    step_ids = torch.randint(3, base.config.vocab_size, (rows, 1))
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)

        def step(**kwargs):
            model(input_ids=step_ids, past_key_values=copy.deepcopy(cache), use_cache=True, logits_to_keep=1,
                  **kwargs)

        def per_row():
            with rows_on_adapters(layers, names):
                step()

        def copy_only():
            copy.deepcopy(cache)

        variants = {"one adapter": step, "two, peft adapter_names=": lambda: step(adapter_names=names),
                    "two, per-row scaling": per_row, "(copying the cache, in each)": copy_only}
        timings = {k: [] for k in variants}
        for fn in variants.values():
            fn()
        for _ in range(runs):  # interleaved, so that a slow spell of the machine hits every variant
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                timings[name].append((time.perf_counter() - start) / 10)
    return {k: sorted(v)[len(v) // 2] * 1000 for k, v in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built there if missing)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from chatbot.models import resolve_model_path

    model_dir = Path(resolve_model_path("starter", args.data_dir))
    rows = []
    for batch in (2, 8, 32):
        t = step_times(model_dir, batch, args.runs)
        rows.append([batch, f"{t['one adapter']:.2f}", f"{t['two, peft adapter_names=']:.2f}",
                     f"{t['two, per-row scaling']:.2f}", f"{t['(copying the cache, in each)']:.2f}",
                     f"{t['two, peft adapter_names='] / t['one adapter']:.2f}x",
                     f"{t['two, per-row scaling'] / t['one adapter']:.2f}x"])
        print(rows[-1], flush=True)
    body = table(["rows", "ms, one adapter", "ms, two: peft adapter_names=", "ms, two: per-row scaling",
                  "ms of it copying the cache", "peft against one", "per-row against one"], rows)
    body += ("\n\nThe starter, LoRA rank 16 on every projection, half the rows on each adapter; one decode step "
             "after a 24-token prompt, median of interleaved runs of 10 steps (each step works on a copy of the "
             "cache, whose time is in every column).")
    print(body)
    if not args.no_write:
        write_section("mixed-batch", "A decode step with rows on two adapters",
                      "python benchmarks/bench_mixed_batch.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      body)


if __name__ == "__main__":
    main()
