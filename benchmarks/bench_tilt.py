"""What keeps the language when the tilt is distilled: variants side by side.

One tilt (`online_rl.tilt.train_tilt`) per variant on the starter, with the
true taste as the reward (1 liked, 0 not: no reward model in between, so
that what is compared is the distillation alone), from the same fresh
adapter on the same 512 training prompts; approval on the true taste, base
NLL per token (plain and excess) and known words of the replies to 128
held-out prompts × 12, beside the base's own. The epoch stop is off (every epoch is trained), so
that each variant shows what its training does to the language; the
per-epoch validation figures are kept in the JSON.

    python benchmarks/bench_tilt.py --data-dir /work/cache [--taste long]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402

# (label, TiltConfig overrides): every variant trains 3 epochs without the epoch stop.
VARIANTS = (
    ("weighted NLL at every token, nothing else", dict(choice_entropy=-1.0, anchor_coef=0.0, language_coef=0.0,
                                                       min_spread=0.0, outside_coef=0.0)),
    ("choice tokens only, the base held elsewhere (KL, weight 8)", dict(language_coef=0.0, min_spread=0.0,
                                                                        outside_coef=0.0)),
    ("choice tokens only, the base held elsewhere, excess NLL per token in the weights, prompts whose replies all "
     "score alike left out, served words outside the base's nucleus penalized (the default)", dict()),
    ("the default at lr 3e-3", dict(lr=3e-3)),
    ("the default with prompts whose replies all score alike kept in", dict(min_spread=0.0)),
    ("the default without the loss on served words outside the base's nucleus", dict(outside_coef=0.0)),
)


def measure(policy, tokenizer, prompts, taste, settings, samples: int, adapter: bool) -> dict:
    import contextlib

    import torch

    from online_rl.language import drift, known_word_fraction
    from online_rl.sampling import sample_many

    torch.manual_seed(7)
    off = contextlib.nullcontext() if adapter else policy.disable_adapter()
    with off:
        batches = sample_many(policy, tokenizer, [[{"role": "user", "content": p}] for p in prompts] * samples,
                              settings, batch_size=128)
    language = drift(policy, batches, settings, base_wrote=not adapter)
    texts = [t for b in batches for t in b["texts"]]
    liked = [bool(taste(p, t)) for p, t in zip(prompts * samples, texts)]
    return {"approval": round(sum(liked) / len(liked), 3), "base_nll": language["base_nll"],
            "excess_nll": language["excess_nll"], "known_words": known_word_fraction(texts),
            "words": round(sum(len(t.split()) for t in texts) / len(texts), 2), "examples": texts[:6]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--taste", default="long")
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/tilt.json")
    parser.add_argument("--variants", default=None,
                        help="comma-separated numbers of the variants to run, from 1 (default: all)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    chosen = VARIANTS if not args.variants else [VARIANTS[int(i) - 1] for i in args.variants.split(",")]

    import torch

    from chatbot.models import GenerationSettings, load_model
    from chatbot.starter import ensure_starter
    from online_rl.ppo import add_lora
    from online_rl.simulate import corpus_prompts
    from online_rl.tastes import resolve
    from online_rl.tilt import TiltConfig, train_tilt

    torch.set_num_threads(2)
    starter = str(ensure_starter(args.data_dir))
    taste = resolve(args.taste)
    train_prompts, held = corpus_prompts(0, 200)
    held = held[: args.heldout]
    chats = [[{"role": "user", "content": p}] for p in train_prompts]
    settings = GenerationSettings()

    def reward(prompts, replies):
        return [float(taste(p[-1]["content"], r)) for p, r in zip(prompts, replies)]

    results = {}
    for label, overrides in (("base", None), *chosen):
        loaded = load_model(starter, args.data_dir, device="cpu")
        tokenizer = loaded.tokenizer
        tokenizer.padding_side = "left"
        config = dataclasses.replace(TiltConfig(max_nll_increase=1e9), **(overrides or {}))
        policy = add_lora(loaded.model, config)
        policy.eval()
        if overrides is None:
            results[label] = measure(policy, tokenizer, held, taste, settings, args.samples, adapter=False)
        else:
            metrics = train_tilt(policy, tokenizer, chats, reward, settings, config,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
            policy.eval()
            results[label] = {**measure(policy, tokenizer, held, taste, settings, args.samples, adapter=True),
                              "history": metrics["history"], "seconds": metrics["seconds"]}
        print(label, {k: v for k, v in results[label].items() if k != "history"}, file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    base = results["base"]
    rows = [[label, f"{r['approval']:.3f}", f"{r['base_nll']:.3f}", f"{r['excess_nll']:+.3f}", f"{r['known_words']:.3f}",
             f"{r['words']:.1f}", f"{r['seconds']:.0f} s" if "seconds" in r else ""] for label, r in results.items()]
    body = table(["variant", "approval", "base NLL/token", "excess NLL/token", "known words", "mean words", "training"],
                 rows)
    body += (f"\n\nTaste `{args.taste}` as the reward (1 liked, 0 not); 512 prompts drawn from the corpus "
             f"training prompts × 8 replies at the serving settings, 3 epochs each, the epoch stop off; "
             f"approval and language on {args.heldout} held-out prompts × {args.samples}. The base NLL of "
             f"{args.heldout * args.samples} replies moves by about ±0.03 between two samplings of one model, the "
             f"excess (what the gate bounds, expected over each version's own distribution) by less. "
             f"The goal the loop is held to: base NLL at most 10% above the base's own "
             f"({base['base_nll'] * 1.1:.3f}) and known words ≥ 0.92.\n")
    print(body)
    if not args.no_write:
        write_section("tilt", "The tilt's distillation: what keeps the language (starter model, CPU)",
                      "python benchmarks/bench_tilt.py " + " ".join(sys.argv[1:] if argv is None else argv), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
