"""How noisy is the gate's language figure? One pair of versions, sampled again and again.

A version (the active one of `--data-dir`, or `--version`) and the base
each reply to the same held-out corpus prompts, `samples` times each, once
per seed. For each sampling: the base's NLL per token of the replies, from
the tokens drawn and as the gate takes it (expected over the distribution
each token was drawn from, `online_rl.language.expected_nll`), and the
version's figure minus the base's, which is what the gate bounds. Nothing
changes between seeds but the draw, so the spread of that difference is
the figure's noise.

    python benchmarks/bench_language_noise.py --data-dir DIR [--samples 4,16] [--seeds 1,2,3,4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def figures(model, tokenizer, prompts, settings, seed: int, adapter: bool) -> dict:
    """Per-reply means of the drawn tokens' base NLL and of the expected one."""
    import contextlib

    import torch

    from online_rl.language import expected_nll, mean_of, version_and_base_logits
    from online_rl.sampling import sample_many, token_logprobs

    torch.manual_seed(seed)
    with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
        batches = sample_many(model, tokenizer, prompts, settings)
    drawn, expected = [], []
    for piece, own, base in version_and_base_logits(model, batches, contextlib.nullcontext if adapter else None):
        drawn += (-token_logprobs(base, piece).sum(-1) / piece["reply_mask"].sum(-1).clamp(min=1)).tolist()
        expected += expected_nll(own, base, piece, settings).tolist()
    return {"drawn": mean_of(drawn), "expected": mean_of(expected)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a data directory with a promoted version")
    parser.add_argument("--model", default=None, help="the base model (default: the starter in --data-dir)")
    parser.add_argument("--version", default=None, help="the version to measure (default: the active one)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", default="4,16", help="replies per prompt, comma-separated")
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--out", default="benchmarks/results/language_noise.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from chatbot.models import GenerationSettings
    from chatbot.starter import ensure_starter
    from online_rl.simulate import Bot, corpus_prompts
    from storage import Store

    torch.set_num_threads(2)
    store = Store.in_data_dir(args.data_dir)
    bot = Bot(store, args.data_dir, args.model or str(ensure_starter(args.data_dir)), "cpu", version=args.version)
    if not hasattr(bot.model, "disable_adapter"):
        parser.error(f"{args.data_dir} serves the base: promote a version first, or name one with --version")
    _, held = corpus_prompts(0, 200)
    prompts = [[{"role": "user", "content": p}] for p in held[: args.prompts]]
    settings = GenerationSettings()
    results, rows, spreads = [], [], []
    for samples in [int(s) for s in args.samples.split(",")]:
        repeated = [p for p in prompts for _ in range(samples)]
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            version = figures(bot.model, bot.loaded.tokenizer, repeated, settings, seed, adapter=True)
            base = figures(bot.model, bot.loaded.tokenizer, repeated, settings, seed, adapter=False)
            run = {"replies": len(repeated), "seed": seed, "version": version, "base": base,
                   "difference": {k: round(version[k] - base[k], 4) for k in version}}
            runs.append(run)
            print(run, file=sys.stderr, flush=True)
            rows.append([len(repeated), seed, f"{version['drawn']:.3f} / {version['expected']:.3f}",
                         f"{base['drawn']:.3f} / {base['expected']:.3f}",
                         f"{run['difference']['drawn']:+.3f} / {run['difference']['expected']:+.3f}"])
        for key in ("drawn", "expected"):
            diffs = [r["difference"][key] for r in runs]
            spreads.append([len(repeated), key, f"{min(diffs):+.3f} to {max(diffs):+.3f}",
                            f"{statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""])
        results += runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    body = table(["replies per version", "seed", "version: drawn / expected", "base: drawn / expected",
                  "version − base: drawn / expected"], rows)
    body += "\n\n" + table(["replies per version", "estimate", "version − base over the seeds", "standard deviation"],
                           spreads)
    body += (f"\n\nVersion {bot.version} of `{args.data_dir}` against the base, on {len(prompts)} held-out corpus "
             "prompts at the serving settings (temperature 0.8, nucleus 0.95); base NLL per token, averaged over "
             "each reply's tokens, then over the replies. *drawn*: of the tokens drawn; *expected*: at each position "
             "expected over the distribution the token was drawn from (the gate's figure). The gate's bound is "
             "10% of the base's own, about 0.045 nats per token here.\n")
    print(body)
    if not args.no_write:
        write_section("language-noise", "The language figure's noise: one pair of versions sampled again (CPU)",
                      "python benchmarks/bench_language_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
