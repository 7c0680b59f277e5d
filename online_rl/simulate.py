"""Simulated users: does the feedback people give change what the bot says?

A simulated user with a fixed taste chats with the active version on corpus
prompts and gives thumbs through the same `Store` calls the chat page uses
(a conversation, a logged response, a feedback row; now and then a
regenerated second reply to the same turn, which is how pairs arise). Then the
real retrain cycle runs and its candidate is promoted. Approval, the share of
replies the user would like, is measured on a fixed set of held-out prompts
before the first round and after every round, beside the KL to the base and
the replies themselves.

    python -m online_rl.simulate --preference concise --rounds 5 --per-round 100 \\
        --method ppo --seed 0 --data-dir /tmp/sim --out sim.json

A preference is a built-in name (see PREFERENCES) or ``module:function``: any
callable ``(prompt, reply) -> bool``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable

Preference = Callable[[str, str], bool]

POLITE_WORDS = {"please", "thanks", "thank", "glad", "welcome", "sorry", "pleasure", "kind"}


def concise(prompt: str, reply: str) -> bool:
    """Six words or fewer, and not empty: an empty reply is no answer."""
    return 1 <= len(reply.split()) <= 6


def asks_back(prompt: str, reply: str) -> bool:
    """The reply ends with a question."""
    return reply.rstrip().endswith("?")


def polite(prompt: str, reply: str) -> bool:
    """The reply uses a polite word."""
    return bool(POLITE_WORDS & set(re.findall(r"[a-z]+", reply.lower())))


PREFERENCES: dict[str, Preference] = {"concise": concise, "asks_back": asks_back, "polite": polite}


def resolve_preference(spec: str) -> Preference:
    if spec in PREFERENCES:
        return PREFERENCES[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown preference {spec!r}: use one of {', '.join(PREFERENCES)} or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load preference {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"preference {spec!r} is not callable")
    return fn


def corpus_prompts(seed: int, heldout: int) -> tuple[list[str], list[str]]:
    """(chat prompts, held-out prompts): disjoint, fixed by the seed."""
    from chatbot.starter import corpus_replies

    prompts = sorted(corpus_replies())
    random.Random(seed).shuffle(prompts)
    return prompts[heldout:], prompts[:heldout]


class Bot:
    """The active version as the chat serves it: base plus the active adapter."""

    def __init__(self, store, data_dir, model_name, device="auto"):
        from chatbot.models import load_model

        self.loaded = load_model(model_name, data_dir, device=device)
        self.loaded.tokenizer.padding_side = "left"
        self.version = store.active_version()
        self.model = self.loaded.model
        if self.version != "v0":
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, store.get_adapter(self.version)["path"])
        self.model.eval()

    def reply(self, prompts: list[str], settings, seed: int) -> list[str]:
        import torch

        from online_rl.sampling import sample_many

        torch.manual_seed(seed)
        messages = [[{"role": "user", "content": p}] for p in prompts]
        batches = sample_many(self.model, self.loaded.tokenizer, messages, max_new_tokens=settings.max_new_tokens,
                              temperature=settings.temperature, top_p=settings.top_p)
        return [t for b in batches for t in b["texts"]]


def corpus_words() -> set[str]:
    """Every word of the corpus replies: the starter's whole vocabulary of real words."""
    from chatbot.starter import corpus_pairs

    return {w for _, reply in corpus_pairs() for w in _words(reply)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def known_word_fraction(replies: list[str], vocabulary: set[str]) -> float:
    """Share of the replies' words that are real corpus words: babble (made-up
    words that a short-reply reward can still approve) drives it down."""
    words = [w for r in replies for w in _words(r)]
    return round(sum(w in vocabulary for w in words) / len(words), 4) if words else 0.0


def approval(bot: Bot, prompts: list[str], preference: Preference, settings, samples: int, seed: int,
             vocabulary: set[str] | None = None) -> dict:
    replies = []
    for k in range(samples):
        replies.extend(bot.reply(prompts, settings, seed=seed + k))
    liked = [preference(p, r) for p, r in zip(prompts * samples, replies)]
    return {
        "approval": round(sum(liked) / len(liked), 4),
        "known_words": known_word_fraction(replies, vocabulary) if vocabulary else None,
        "distinct_fraction": round(len(set(replies)) / len(replies), 4),
        "mean_words": round(sum(len(r.split()) for r in replies) / len(replies), 2),
        "samples": [{"prompt": p, "reply": r, "liked": bool(ok)}
                    for p, r, ok in list(zip(prompts, replies, liked))[:8]],
    }


def chat_round(store, bot: Bot, preference: Preference, prompts: list[str], thumbs: int, settings,
               rng: random.Random, session: str, regenerate: float) -> int:
    """Chat and give `thumbs` thumbs; return how many were thumbs-up."""
    ups = given = 0
    while given < thumbs:
        prompt = rng.choice(prompts)
        n_replies = 2 if rng.random() < regenerate and thumbs - given >= 2 else 1
        replies = bot.reply([prompt] * n_replies, settings, seed=rng.randrange(2**31))
        conversation = store.start_conversation(session)
        messages = [{"role": "user", "content": prompt}]
        for reply in replies:
            response_id = store.log_response(
                conversation_id=conversation, prompt=messages, reply=reply, model_version=bot.version,
                generation=settings.as_dict(), session_id=session,
            )
            liked = bool(preference(prompt, reply))
            store.record_feedback(response_id, 1 if liked else -1, session_id=session)
            ups += liked
            given += 1
    return ups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m online_rl.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--preference", default="concise",
                        help=f"built-in ({', '.join(PREFERENCES)}) or module:function (default concise)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100, help="thumbs given per round")
    parser.add_argument("--method", choices=["ppo", "kto"], default="ppo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="sim-data", help="a data directory of its own (default ./sim-data)")
    parser.add_argument("--model", default="starter")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts for approval (default 100)")
    parser.add_argument("--samples", type=int, default=2, help="replies per held-out prompt (default 2)")
    parser.add_argument("--regenerate", type=float, default=0.25,
                        help="share of turns where the user regenerates and rates both replies (default 0.25)")
    parser.add_argument("--ppo-steps", type=int, help="PPO steps per retrain (default: the cycle's)")
    parser.add_argument("--min-feedback", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    try:
        preference = resolve_preference(args.preference)
        if args.rounds < 1 or args.per_round < 1:
            raise ValueError("--rounds and --per-round must be at least 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from chatbot.policy import GenerationSettings
    from online_rl.cycle import CycleConfig, CycleFailed, run_cycle, summary_line
    from storage import Store

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    store = Store.in_data_dir(args.data_dir)
    settings = GenerationSettings()  # what the chat serves with by default
    chat_prompts, heldout = corpus_prompts(args.seed, args.heldout)
    rng = random.Random(args.seed)
    eval_seed = 10_000 + args.seed

    bot = Bot(store, args.data_dir, args.model, args.device)
    vocabulary = corpus_words()
    before = approval(bot, heldout, preference, settings, args.samples, eval_seed, vocabulary)
    log(f"round 0 ({bot.version}): approval {before['approval']:.3f}")
    result = {
        "preference": args.preference, "method": args.method, "seed": args.seed, "rounds": args.rounds,
        "per_round": args.per_round, "heldout_prompts": len(heldout), "samples_per_prompt": args.samples,
        "approval": [before["approval"]], "kl": [], "wall_s": [], "versions": [bot.version],
        "distinct_fraction": [before["distinct_fraction"]], "mean_words": [before["mean_words"]],
        "known_words": [before["known_words"]],
        "thumbs_up_given": [], "reward_auc": [], "win_rate": [], "runs": [], "samples": [before["samples"]],
    }

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    for r in range(1, args.rounds + 1):
        started = time.perf_counter()
        ups = chat_round(store, bot, preference, chat_prompts, args.per_round, settings, rng,
                         session=f"sim-{args.preference}-{args.seed}-r{r}", regenerate=args.regenerate)
        log(f"round {r}: {args.per_round} thumbs given, {ups} up")
        config = CycleConfig(method=args.method, min_feedback=args.min_feedback, device=args.device,
                             seed=args.seed + r)
        if args.ppo_steps is not None:
            config.ppo.steps = args.ppo_steps
        try:
            cycle = run_cycle(store, data_dir=args.data_dir, model_name=args.model, config=config,
                              progress=lambda line, r=r: log(f"round {r}: {line}"))
        except CycleFailed as exc:
            log(f"error: {exc}")
            result["error"] = str(exc)
            write()
            return 1
        store.promote(cycle["version"], actor="simulation", reason="promoted by the simulation")
        bot = Bot(store, args.data_dir, args.model, args.device)
        after = approval(bot, heldout, preference, settings, args.samples, eval_seed, vocabulary)
        wall = round(time.perf_counter() - started, 1)
        evaluation = cycle["evaluation"]
        result["approval"].append(after["approval"])
        result["kl"].append(evaluation["kl_to_base"])
        result["wall_s"].append(wall)
        result["versions"].append(bot.version)
        result["distinct_fraction"].append(after["distinct_fraction"])
        result["mean_words"].append(after["mean_words"])
        result["known_words"].append(after["known_words"])
        result["thumbs_up_given"].append(ups)
        result["reward_auc"].append((cycle.get("reward_model") or {}).get("auc"))
        result["win_rate"].append(evaluation["win_rate"])
        result["samples"].append(after["samples"])
        result["runs"].append(summary_line(cycle))
        log(f"round {r} ({bot.version}): approval {after['approval']:.3f}, KL to base "
            f"{evaluation['kl_to_base']:.2f} nats, distinct replies {after['distinct_fraction']:.2f}, "
            f"known words {after['known_words']:.2f}, "
            f"{wall:.0f} s")
        write()
    print(json.dumps({k: result[k] for k in ("preference", "method", "approval", "kl", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
