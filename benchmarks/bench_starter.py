"""Build the starter model from scratch and measure it.

Reports the build time (tokenizer, training, evaluation, save), the greedy
match rate on every corpus prompt (the reply is one of that prompt's corpus
replies), and how much sampled replies vary at temperature 1.

    python benchmarks/bench_starter.py [--samples 8] [--prompts 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import table, write_section  # noqa: E402
from chatbot import starter  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="replies sampled per prompt")
    parser.add_argument("--prompts", type=int, default=50, help="prompts sampled from")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "starter"
        started = time.perf_counter()
        info = starter.build_starter(out)
        wall = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)

    replies = starter.corpus_replies()
    prompts = sorted(replies)[:: max(1, len(replies) // args.prompts)][: args.prompts]
    distinct, in_corpus, total = [], 0, 0
    torch.manual_seed(0)
    for prompt in prompts:
        got = starter.generate_replies(model, tokenizer, [prompt] * args.samples, do_sample=True,
                                       temperature=1.0, seed=len(distinct))
        distinct.append(len(set(got)))
        in_corpus += sum(g in replies[prompt] for g in got)
        total += len(got)
    examples = []
    for prompt in ("Hello", "How are you?", "What is your name?", "Tell me a joke."):
        got = starter.generate_replies(model, tokenizer, [prompt] * 4, do_sample=True, temperature=1.0, seed=1)
        examples.append([prompt, " / ".join(f"“{g}”" for g in got)])

    body = table(
        ["figure", "value", "goal"],
        [
            ["build time (tokenizer, training, evaluation, save)", f"{wall:.0f} s", "at most 300 s"],
            ["parameters", f"{info['parameters'] / 1e6:.2f}M", ""],
            ["training steps × batch", f"{info['config']['steps']} × {info['config']['batch_size']}", ""],
            ["final training loss (reply tokens)", f"{info['final_loss']:.3f}", ""],
            [f"greedy reply is one of the prompt's corpus replies ({len(replies)} prompts)",
             f"{info['greedy_match_rate']:.1%}", "at least 60%"],
            [f"distinct replies among {args.samples} samples at temperature 1 (mean over {len(prompts)} prompts)",
             f"{sum(distinct) / len(distinct):.2f}", "more than 1"],
            ["sampled replies that are that prompt's corpus replies", f"{in_corpus / total:.1%}", ""],
        ],
    )
    body += "\n\nSampled at temperature 1, four times each:\n\n" + table(["prompt", "replies"], examples)
    print(body)
    if not args.no_write:
        write_section("starter", "Starter model: build time and reply quality",
                      "python benchmarks/bench_starter.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
