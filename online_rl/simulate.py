"""Simulated users: does the feedback people give change what the bot says?

Simulated raters with a fixed taste chat with the active version on corpus
prompts and give thumbs through the same `Store` calls the chat page uses (a
conversation, a logged response, a feedback row; now and then a regenerated
second reply to the same turn, which is how pairs arise). `--raters` people
share the thumbs, and `--noise` flips that share of them (a rater who
misclicks or disagrees with the taste). Then the real retrain cycle runs and
its candidate goes through the evaluation gate, as on the live server
(`--no-gate` promotes every candidate). Approval, the share of replies the
taste likes (always the true taste, without noise), is measured on fixed
held-out prompts before the first round and after every round, with its
standard error, beside the KL to the base, the language figures and the
replies themselves.

    python -m online_rl.simulate --preference long --rounds 5 --per-round 100 \\
        --seed 0 --noise 0.2 --data-dir /tmp/sim --out sim.json

A preference is a built-in taste (`online_rl.tastes`) or ``module:function``:
any callable ``(prompt, reply) -> bool``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
import uuid
from pathlib import Path

from online_rl import METHODS
from online_rl.tastes import TASTES, Taste, resolve


def corpus_prompts(seed: int, heldout: int) -> tuple[list[str], list[str]]:
    """(chat prompts, held-out prompts): disjoint, fixed by the seed."""
    from chatbot.starter import corpus_replies

    prompts = sorted(corpus_replies())
    random.Random(seed).shuffle(prompts)
    return prompts[heldout:], prompts[:heldout]


class Bot:
    """A version as the chat serves it: the base plus the version's adapter."""

    def __init__(self, store, data_dir, model_name, device="auto", version: str | None = None):
        from chatbot.models import load_model

        self.loaded = load_model(model_name, data_dir, device=device)
        self.loaded.tokenizer.padding_side = "left"
        self.version = version or store.active_version()
        self.model = self.loaded.model
        if self.version != "v0":
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, store.get_adapter(self.version)["path"])
        self.model.eval()

    def sample(self, prompts: list[str], settings, seed: int) -> list[dict]:
        import torch

        from online_rl.sampling import sample_many

        torch.manual_seed(seed)
        messages = [[{"role": "user", "content": p}] for p in prompts]
        return sample_many(self.model, self.loaded.tokenizer, messages, settings)

    def reply(self, prompts: list[str], settings, seed: int) -> list[str]:
        return [t for b in self.sample(prompts, settings, seed) for t in b["texts"]]


def approval_and_se(liked: list[bool], n_prompts: int) -> tuple[float, float]:
    """The share liked, and its standard error from the per-prompt means
    (replies to one prompt are not independent). `liked` holds one pass over
    the prompts after another."""
    samples = len(liked) // n_prompts
    per_prompt = [sum(liked[i::n_prompts]) / samples for i in range(n_prompts)]
    mean = sum(per_prompt) / n_prompts
    var = sum((x - mean) ** 2 for x in per_prompt) / max(1, n_prompts - 1)
    return round(sum(liked) / len(liked), 4), round(math.sqrt(var / n_prompts), 4)


def repetition(replies: list[str], liked: list[bool]) -> dict:
    """How much of what is said is a few stock replies: the share of
    `replies` that are one of the ten most common (``top10_share``), and the
    share of the liked ones that are (``top10_liked``). A taste pleased by
    saying a few stock lines to every prompt shows here before it reaches
    the gate's bound on the single most common reply."""
    from online_rl.evaluate import most_common, top_ten_share

    top = most_common(replies)
    in_top = [r in top for r in replies]
    return {"top10_share": top_ten_share(replies),
            "top10_liked": round(sum(t and ok for t, ok in zip(in_top, liked)) / max(1, sum(liked)), 4)}


def approval(bot: Bot, prompts: list[str], taste: Taste, settings, samples: int, seed: int) -> dict:
    """The true taste's approval on held-out prompts, its standard error
    (from the per-prompt means, so replies to one prompt are not counted as
    independent), and the language figures of the replies."""
    from online_rl.language import drift, known_word_fraction

    batches = [b for k in range(samples) for b in bot.sample(prompts, settings, seed + k)]
    replies = [t for b in batches for t in b["texts"]]
    liked = [bool(taste(p, r)) for p, r in zip(prompts * samples, replies)]
    share, se = approval_and_se(liked, len(prompts))
    return {
        "approval": share,
        "se": se,
        "known_words": known_word_fraction(replies),
        **{key: value for key, value in drift(bot.model, batches, settings).items()
           if key in ("base_nll", "excess_nll")},
        "distinct_fraction": round(len(set(replies)) / len(replies), 4),
        **repetition(replies, liked),
        "mean_words": round(sum(len(r.split()) for r in replies) / len(replies), 2),
        "samples": [{"prompt": p, "reply": r, "liked": ok} for p, r, ok in list(zip(prompts, replies, liked))[:8]],
    }


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, set[str]]:
    from chatbot.starter import corpus_replies

    return corpus_replies()


def correction_for(taste: Taste, prompt: str, rng: random.Random) -> str | None:
    """What a simulated person writes in place of a reply they disliked: a
    corpus reply their taste likes, one the corpus gives this prompt if there
    is one, else one given to the corpus prompt sharing the most content
    words (five letters or more) with it; None when no such reply exists (the
    person knows no better answer on topic)."""
    corpus = _corpus()
    own = sorted(r for r in corpus.get(prompt, ()) if taste(prompt, r))
    if own:
        return rng.choice(own)
    words = _content_words(prompt)
    best, overlap = None, 0
    for other in sorted(corpus):
        shared = len(words & _content_words(other))
        if shared > overlap:
            liked = sorted(r for r in corpus[other] if taste(prompt, r))
            if liked:
                best, overlap = rng.choice(liked), shared
    return best


def _content_words(text: str) -> set[str]:
    return {w for w in "".join(c if c.isalnum() else " " for c in text.lower()).split() if len(w) >= 5}


def chat_round(store, bot: Bot, taste: Taste, prompts: list[str], thumbs: int, settings, rng: random.Random,
               session: str, regenerate: float, raters: int = 1, noise: float = 0.0,
               corrections: float = 0.0) -> int:
    """Chat and give `thumbs` thumbs, spread over `raters` sessions, a `noise`
    share of them flipped, and a `corrections` share of the thumbs-down with
    a better reply written in (`correction_for`); return how many were
    thumbs-up."""
    ups = given = 0
    while given < thumbs:
        prompt = rng.choice(prompts)
        rater = f"{session}-rater{rng.randrange(raters)}" if raters > 1 else session
        n_replies = 2 if rng.random() < regenerate and thumbs - given >= 2 else 1
        seed = rng.randrange(2**31)
        replies = bot.reply([prompt] * n_replies, settings, seed=seed)
        # Named from what the seed fixes, not a random id: the held-out split
        # is a hash of the conversation id, and a seed must fix the split too.
        conversation = store.start_conversation(
            rater, conversation_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{rater}/{given}/{seed}").hex)
        messages = [{"role": "user", "content": prompt}]
        for reply in replies:
            response_id = store.log_response(
                conversation_id=conversation, prompt=messages, reply=reply, model_version=bot.version,
                generation=settings.as_dict(), session_id=rater,
            )
            liked = bool(taste(prompt, reply)) != (rng.random() < noise)
            better = None
            if not liked and corrections and rng.random() < corrections:
                better = correction_for(taste, prompt, rng)
            store.record_feedback(response_id, 1 if liked else -1, session_id=rater, correction=better)
            ups += liked
            given += 1
    return ups


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m online_rl.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--preference", default="concise",
                        help=f"built-in taste ({', '.join(TASTES)}) or module:function (default concise)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100, help="thumbs given per round")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0],
                        help="tilt (default), ppo or kto (see the README)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="share of thumbs flipped (default 0)")
    parser.add_argument("--corrections", type=float, default=0.0,
                        help="share of thumbs-down that come with a better reply written in (default 0)")
    parser.add_argument("--raters", type=int, default=5, help="simulated people sharing the thumbs (default 5)")
    parser.add_argument("--no-gate", action="store_true", help="promote every candidate without the gate")
    parser.add_argument("--data-dir", default="sim-data", help="a data directory of its own (default ./sim-data)")
    parser.add_argument("--model", default="starter")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--heldout", type=int, default=200, help="held-out prompts for approval (default 200)")
    parser.add_argument("--samples", type=int, default=3, help="replies per held-out prompt (default 3)")
    parser.add_argument("--regenerate", type=float, default=0.25,
                        help="share of turns where the user regenerates and rates both replies (default 0.25)")
    parser.add_argument("--ppo-steps", type=int, help="PPO steps per retrain (default: the cycle's)")
    parser.add_argument("--min-feedback", type=int, default=20)
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        taste = resolve(args.preference)
        if args.rounds < 1 or args.per_round < 1 or args.raters < 1:
            raise ValueError("--rounds, --per-round and --raters must be at least 1")
        if not 0 <= args.noise < 0.5:
            raise ValueError("--noise must be at least 0 and below 0.5")
        if not 0 <= args.corrections <= 1:
            raise ValueError("--corrections is a share of the thumbs-down, from 0 to 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from chatbot.models import GenerationSettings
    from online_rl.cycle import CycleConfig, CycleFailed, NotEnoughFeedback, run_cycle, summary_line
    from storage import Store

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    store = Store.in_data_dir(args.data_dir)
    settings = GenerationSettings()  # what the chat serves with by default
    chat_prompts, heldout = corpus_prompts(args.seed, args.heldout)
    rng = random.Random(args.seed)
    eval_seed = 10_000 + args.seed

    def measure(bot):
        return approval(bot, heldout, taste, settings, args.samples, eval_seed)

    bot = Bot(store, args.data_dir, args.model, args.device)
    before = measure(bot)
    log(f"round 0 ({bot.version}): approval {before['approval']:.3f} ± {before['se']:.3f}")
    result = {
        "preference": args.preference, "method": args.method, "seed": args.seed, "rounds": args.rounds,
        "per_round": args.per_round, "noise": args.noise, "raters": args.raters, "gate": not args.no_gate,
        "corrections": args.corrections,
        "heldout_prompts": len(heldout), "samples_per_prompt": args.samples,
        "approval": [before["approval"]], "approval_se": [before["se"]], "versions": [bot.version],
        "known_words": [before["known_words"]], "base_nll": [before["base_nll"]],
        "excess_nll": [before["excess_nll"]],
        "distinct_fraction": [before["distinct_fraction"]], "mean_words": [before["mean_words"]],
        "top10_share": [before["top10_share"]], "top10_liked": [before["top10_liked"]],
        "kl_per_token": [0.0], "wall_s": [], "thumbs_up_given": [], "reward_auc": [], "judge_auc": [],
        "win_rate": [], "judge_win_rate": [], "decisions": [], "candidate_approval": [], "runs": [],
        "samples": [before["samples"]],
    }

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    current = before
    for r in range(1, args.rounds + 1):
        started = time.perf_counter()
        ups = chat_round(store, bot, taste, chat_prompts, args.per_round, settings, rng,
                         session=f"sim-{args.seed}-r{r}", regenerate=args.regenerate, raters=args.raters,
                         noise=args.noise, corrections=args.corrections)
        log(f"round {r}: {args.per_round} thumbs given, {ups} up")
        config = CycleConfig(method=args.method, min_feedback=args.min_feedback, device=args.device,
                             seed=args.seed + r, generation=settings, promote=not args.no_gate)
        if args.ppo_steps is not None:
            config.ppo.steps = args.ppo_steps
        cycle, decision, candidate = None, "waiting", None
        try:
            cycle = run_cycle(store, data_dir=args.data_dir, model_name=args.model, config=config,
                              progress=lambda line, r=r: log(f"round {r}: {line}"))
        except NotEnoughFeedback as exc:
            log(f"round {r}: {exc}")
        except CycleFailed as exc:
            log(f"error: {exc}")
            result["error"] = str(exc)
            write()
            return 1
        if cycle is not None:
            if args.no_gate:
                store.promote(cycle["version"], actor="simulation", reason="promoted without the gate (--no-gate)")
            promoted = store.active_version() == cycle["version"]
            decision = "promoted" if promoted else "rejected"
            # The candidate's true approval, promoted or not: how often the gate is right.
            candidate = measure(Bot(store, args.data_dir, args.model, args.device, version=cycle["version"]))
            if promoted:
                bot, current = Bot(store, args.data_dir, args.model, args.device), candidate
        evaluation = (cycle or {}).get("evaluation") or {}
        result["approval"].append(current["approval"])
        result["approval_se"].append(current["se"])
        result["versions"].append(bot.version)
        result["known_words"].append(current["known_words"])
        result["base_nll"].append(current["base_nll"])
        result["excess_nll"].append(current["excess_nll"])
        result["distinct_fraction"].append(current["distinct_fraction"])
        result["top10_share"].append(current["top10_share"])
        result["top10_liked"].append(current["top10_liked"])
        result["mean_words"].append(current["mean_words"])
        if decision == "promoted":
            result["kl_per_token"].append(evaluation.get("kl_per_token"))
        else:
            result["kl_per_token"].append(result["kl_per_token"][-1])
        result["wall_s"].append(round(time.perf_counter() - started, 1))
        result["thumbs_up_given"].append(ups)
        result["reward_auc"].append(((cycle or {}).get("reward_model") or {}).get("auc"))
        result["judge_auc"].append(((cycle or {}).get("judge_model") or {}).get("auc"))
        result["win_rate"].append(evaluation.get("win_rate"))
        result["judge_win_rate"].append(evaluation.get("judge_win_rate"))
        result["decisions"].append({"decision": decision, "version": (cycle or {}).get("version"),
                                    "reason": ((cycle or {}).get("gate") or {}).get("reason"),
                                    "top_ten_share": (evaluation.get("candidate") or {}).get("top_ten_share"),
                                    "base_top_ten_share": (evaluation.get("base") or {}).get("top_ten_share")})
        result["candidate_approval"].append(None if candidate is None else
                                            {"approval": candidate["approval"], "se": candidate["se"],
                                             "known_words": candidate["known_words"],
                                             "base_nll": candidate["base_nll"],
                                             "excess_nll": candidate["excess_nll"]})
        result["samples"].append(current["samples"])
        if cycle is not None:
            # The tilt's epochs, in brief: what its stop saw beside what the gate measured.
            history = (cycle.get("train") or {}).get("history") or []
            epochs = [{k: e.get(k) for k in ("epoch", "language_coef", "val_score", "val_excess_nll", "val_kl",
                                             "within_bound")}
                      for e in history if isinstance(e, dict) and "epoch" in e]
            result["runs"].append({**summary_line(cycle), "epochs": epochs})
        log(f"round {r} ({bot.version}, candidate {decision}): approval {current['approval']:.3f} ± "
            f"{current['se']:.3f}, known words {current['known_words']}, base NLL {current['base_nll']} "
            f"(excess {current['excess_nll']}), "
            f"mean words {current['mean_words']}, {result['wall_s'][-1]:.0f} s")
        write()
    print(json.dumps({k: result[k] for k in ("preference", "method", "approval", "kl_per_token", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
