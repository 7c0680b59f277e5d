"""Room to learn: how much each taste could gain by choosing among the
replies a model already gives.

A policy update can only move a bot toward replies it already samples now
and then; a bot that says the same thing to a prompt every time leaves no
taste any room, whatever the learning algorithm. For each model named,
sampled as the bot serves (temperature 0.8, top-p 0.95, 96 tokens), 16
replies to each of 100 held-out corpus prompts: per taste of the suite, the
share liked (what the bot earns today) and the share of prompts where at
least one of the 16 is liked (best-of-16: the most that choosing among its
own replies could earn), beside the language figures of those replies (base
NLL per token, its excess over the base's own choices at the same
positions, known words) and the distinct replies per prompt.

And the exact tilt of those replies, the distribution a KL-regularized
update aims at (``base * exp(lambda * liked)``, normalized over each
prompt's 16; `online_rl.tilt` distills it): its approval, its base NLL per
token and its excess NLL per token (`online_rl.language.drawn_excess`),
beside the base's own. Does moving toward the taste cost language, before
any training error adds its own? And, for scale, the same figures of
replies sampled hotter (temperature 1.0 and 1.3, no nucleus), which lose
their words.

    python benchmarks/bench_headroom.py MODEL_DIR [MODEL_DIR ...] [--labels a,b]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


LAMBDAS = (2.0, 4.0)


def tilt(liked: list[list[bool]], nll: list[list[float]], lam: float,
         excess: list[list[float]] | None = None) -> tuple[float, float, float]:
    """(approval, base NLL per token, excess NLL per token) of each prompt's
    replies weighted by exp(lam * liked), averaged over the prompts."""
    import math

    excess = excess or nll
    approval = language = surplus = 0.0
    for likes, costs, extra in zip(liked, nll, excess):
        w = [math.exp(lam * x) for x in likes]
        total = sum(w)
        approval += sum(wi * x for wi, x in zip(w, likes)) / total
        language += sum(wi * c for wi, c in zip(w, costs)) / total
        surplus += sum(wi * c for wi, c in zip(w, extra)) / total
    return approval / len(liked), language / len(liked), surplus / len(liked)


HOTTER = (1.0, 1.3)  # sampling temperatures (no nucleus) of the babble controls


def headroom(path: str, prompts: list[str], samples: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.models import GenerationSettings
    from online_rl.language import drawn_excess, known_word_fraction
    from online_rl.sampling import reply_logits, sample_many, token_logprobs
    from online_rl.tastes import TASTES

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    settings = GenerationSettings(max_new_tokens=96, temperature=0.8, top_p=0.95)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    replies: list[list[str]] = [[] for _ in prompts]
    per_reply, excess = [[] for _ in prompts], [[] for _ in prompts]
    for k in range(samples):
        torch.manual_seed(k)
        for batch in sample_many(model, tokenizer, messages, settings, batch_size=len(prompts)):
            for i, text in enumerate(batch["texts"]):
                replies[i].append(text)
            logits = reply_logits(model, batch)
            logp = token_logprobs(logits, batch, 1.0)
            mask = batch["reply_mask"]
            for i, x in enumerate((-logp.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()):
                per_reply[i].append(x)
            for i, x in enumerate(drawn_excess(logits, batch["reply"], mask, settings).tolist()):
                excess[i].append(x)
    flat = [r for rs in replies for r in rs]
    tastes = {}
    for name, taste in TASTES.items():
        liked = [[bool(taste(p, r)) for r in rs] for p, rs in zip(prompts, replies)]
        tilts = {lam: tilt(liked, per_reply, lam, excess) for lam in LAMBDAS}
        tastes[name] = (sum(map(sum, liked)) / len(flat), sum(any(x) for x in liked) / len(prompts), tilts)
    hotter = {}
    for temperature in HOTTER:  # against the serving settings' position costs
        hot_settings = GenerationSettings(max_new_tokens=96, temperature=temperature, top_p=1.0)
        hot_texts, hot_nll, hot_excess = [], [], []
        for k in range(4):
            torch.manual_seed(k)
            for batch in sample_many(model, tokenizer, messages, hot_settings, batch_size=len(prompts)):
                logits = reply_logits(model, batch)
                mask = batch["reply_mask"]
                hot_texts += batch["texts"]
                hot_nll += (-token_logprobs(logits, batch, 1.0).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
                hot_excess += drawn_excess(logits, batch["reply"], mask, settings).tolist()
        hotter[temperature] = (sum(hot_nll) / len(hot_nll), sum(hot_excess) / len(hot_excess),
                               known_word_fraction(hot_texts))
    flat_excess, flat_nll = [x for xs in excess for x in xs], [x for xs in per_reply for x in xs]
    return {"nll": sum(flat_nll) / len(flat_nll), "excess": sum(flat_excess) / len(flat_excess), "hotter": hotter,
            "known": known_word_fraction(flat),
            "distinct": sum(len(set(rs)) for rs in replies) / len(prompts), "tastes": tastes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (a starter build, or any causal LM)")
    parser.add_argument("--labels", help="comma-separated names for the models (default: the directory names)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out corpus prompts (default 100)")
    parser.add_argument("--samples", type=int, default=16, help="replies per prompt (default 16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    from online_rl.simulate import corpus_prompts

    labels = args.labels.split(",") if args.labels else [Path(m).name for m in args.models]
    if len(labels) != len(args.models):
        parser.error("--labels needs one name per model")
    prompts = corpus_prompts(0, 200)[1][: args.prompts]
    results = {label: headroom(path, prompts, args.samples) for label, path in zip(labels, args.models)}
    n = args.samples
    language = table(["model", "base NLL/token (drawn)", "excess NLL/token (drawn)", "known words",
                      f"distinct replies of {n}"],
                     [[label, f"{r['nll']:.3f}", f"{r['excess']:+.3f}", f"{r['known']:.3f}", f"{r['distinct']:.1f}"]
                      for label, r in results.items()])
    hotter = table(["model", "sampled at", "base NLL/token (drawn)", "excess NLL/token (drawn)", "known words"],
                   [[label, f"temperature {t:g}, no nucleus", f"{h[0]:.3f}", f"{h[1]:+.3f}", f"{h[2]:.3f}"]
                    for label, r in results.items() for t, h in r["hotter"].items()])
    tastes = table(["taste"] + [f"{label}: liked / best-of-{n}" for label in results],
                   [[name] + [f"{r['tastes'][name][0]:.2f} / {r['tastes'][name][1]:.2f}" for r in results.values()]
                    for name in next(iter(results.values()))["tastes"]])
    tilted = table(["taste"] + [f"{label}: tilt λ={lam:g} approval / NLL / excess" for label in results
                                for lam in LAMBDAS],
                   [[name] + ["{:.2f} / {:.3f} / {:+.3f}".format(*r["tastes"][name][2][lam])
                              for r in results.values() for lam in LAMBDAS]
                    for name in next(iter(results.values()))["tastes"]])
    body = (f"{args.prompts} held-out corpus prompts × {n} replies at the serving settings (temperature 0.8, "
            f"top-p 0.95, 96 tokens). *Liked*: the share of replies the taste likes; *best-of-{n}*: the share "
            f"of prompts with at least one liked reply among the {n}, the most that choosing among the "
            f"model's own replies could earn.\n\n{language}\n\n{tastes}\n\n"
            f"*Tilt λ*: each prompt's {n} replies weighted by exp(λ × liked): the approval of that distribution "
            "and its base NLL per token (drawn tokens, temperature 1) and excess NLL per token (each token's "
            "NLL less what the base's own choice at the serving settings costs at the same position), to "
            "compare with the base's own above. λ = 4 makes a liked reply 55 times as likely as before, "
            f"relative to the others.\n\n{tilted}\n\n"
            f"For scale, {4} replies per prompt sampled hotter, whose words fall apart (excess against the "
            f"serving settings' choices):\n\n{hotter}\n")
    print(body)
    if not args.no_write:
        command = "python benchmarks/bench_headroom.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section("headroom", "Room to learn: choosing among the starter's own replies", command, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
