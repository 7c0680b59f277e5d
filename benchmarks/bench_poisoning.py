"""Poisoning: can one rater with many thumbs outvote many raters with a few each?

One loud rater gives `--loud` thumbs by one taste (default `concise`);
`--quiet-raters` raters give `--quiet-thumbs` each by the opposite taste
(default `long`). They chat with the starter model (v0) and rate its replies
through the same `Store` calls as the chat page (`online_rl.simulate.chat_round`:
a quarter of the turns regenerated, which is how pairs arise). The same
thumbs (one database, copied) then go through one retrain cycle twice: with
the rater bound (`max_rater_share` 5%) and without it (1.0). For each:

- the loud rater's share of the reward model's thumbs before and after the
  bound, as the run recorded it;
- the policy's reward model: its AUC on its held-out thumbs, and how well
  it ranks fresh v0 replies to held-out prompts by each taste (AUC against
  the quiet taste's verdicts and against the loud one's);
- the candidate policy's approval under each taste on those prompts (with
  its standard error), beside v0's.

Both cycles train a policy whatever the reward model's held-out AUC (the
cycle's usual wait for an informative reward model is off), so that the two
candidates can be compared; the gate is not applied.

    python benchmarks/bench_poisoning.py --data-dir /work/cache            # 1,000 against 20 x 50
    python benchmarks/bench_poisoning.py --data-dir /work/cache --scale 0.1 --ppo-steps 5   # a tiny budget
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402
from online_rl import METHODS  # noqa: E402

BOUNDS = (("on (5%)", 0.05), ("off", 1.0))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--loud", type=int, default=1000, help="thumbs of the loud rater (default 1000)")
    parser.add_argument("--quiet-raters", type=int, default=20)
    parser.add_argument("--quiet-thumbs", type=int, default=50, help="thumbs of each quiet rater (default 50)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every thumb count (0.1: a tiny budget)")
    parser.add_argument("--loud-taste", default="concise")
    parser.add_argument("--quiet-taste", default="long")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0], help="how the cycle updates the policy")
    parser.add_argument("--ppo-steps", type=int, help="PPO steps per cycle (default: the cycle's)")
    parser.add_argument("--reward-epochs", type=int, help="most reward-model epochs (default: the cycle's)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts (default 100)")
    parser.add_argument("--samples", type=int, default=2, help="replies per held-out prompt (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench-poisoning", help="per-condition JSON and logs go here")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    return parser


def give_thumbs(store, bot, args, settings, prompts: list[str]) -> dict:
    """The loud rater's thumbs, then each quiet rater's; thumbs-up counts."""
    from online_rl.simulate import chat_round
    from online_rl.tastes import resolve

    rng = random.Random(args.seed)
    loud, quiet = resolve(args.loud_taste), resolve(args.quiet_taste)
    ups = {"loud": chat_round(store, bot, loud, prompts, args.n_loud, settings, rng, session="loud",
                              regenerate=0.25)}
    ups["quiet"] = sum(chat_round(store, bot, quiet, prompts, args.n_quiet, settings, rng, session=f"quiet{i:02d}",
                                  regenerate=0.25) for i in range(args.quiet_raters))
    return ups


def copy_database(source: Path, data_dir: Path) -> None:
    from storage.store import DB_FILENAME

    data_dir.mkdir(parents=True)
    with sqlite3.connect(source) as src, sqlite3.connect(data_dir / DB_FILENAME) as dst:
        src.backup(dst)


def taste_approval(bot, prompts: list[str], tastes: dict, settings, samples: int, seed: int) -> dict:
    """Approval and its standard error under each taste, from one set of replies."""
    from online_rl.simulate import approval_and_se

    replies = [t for k in range(samples) for b in bot.sample(prompts, settings, seed + k) for t in b["texts"]]
    out = {}
    for name, taste in tastes.items():
        share, se = approval_and_se([bool(taste(p, r)) for p, r in zip(prompts * samples, replies)], len(prompts))
        out[name] = {"approval": share, "se": se}
    return out


def reward_model_auc(path: str, base_path: str, tokenizer, replies: list[tuple[str, str]], tastes: dict,
                     device) -> dict:
    """How well the reward model ranks `replies` (prompt, reply) by each taste."""
    from online_rl.reward import auc, load_reward_model

    rm = load_reward_model(base_path, path, tokenizer, device)
    scores = rm.score([[{"role": "user", "content": p}] for p, _ in replies], [r for _, r in replies])
    return {name: auc(scores, [bool(taste(p, r)) for p, r in replies]) for name, taste in tastes.items()}


def run_condition(label: str, share: float, source: Path, work: Path, args, starter: str, context: dict) -> dict:
    import torch

    from chatbot.models import load_tokenizer
    from online_rl.cycle import CycleConfig, run_cycle
    from online_rl.simulate import Bot
    from storage import Store

    data_dir = work / f"bound-{share:g}"
    copy_database(source, data_dir)
    store = Store.in_data_dir(data_dir)
    config = CycleConfig(method=args.method, device=args.device, seed=args.seed, generation=context["settings"])
    config.data.max_rater_share = share
    config.reward.min_auc_low = -1.0  # train a policy either way, to compare the two
    if args.ppo_steps:
        config.ppo.steps = args.ppo_steps
    if args.reward_epochs:
        config.reward.epochs = args.reward_epochs
    started = time.perf_counter()
    with open(Path(args.out) / f"bound-{share:g}.log", "w") as log:
        cycle = run_cycle(store, data_dir=data_dir, model_name=starter, config=config,
                          progress=lambda line: print(line, file=log, flush=True))
    wall = time.perf_counter() - started
    loud = next(r for r in cycle["rater_shares"]["thumbs"]["top"] if r["rater"] == "session:loud")
    tokenizer = load_tokenizer(starter)
    candidate = Bot(store, data_dir, starter, args.device, version=cycle["version"])
    result = {
        "bound": label, "max_rater_share": share, "loud_share": loud, "cycle_s": round(wall, 1),
        "reward_auc_heldout": cycle["reward_model"]["auc"], "reward_best_epoch": cycle["reward_model"]["best_epoch"],
        "reward_auc_by_taste": reward_model_auc(cycle["reward_model_path"], starter, tokenizer,
                                                context["replies"], context["tastes"], torch.device(args.device)),
        "candidate": taste_approval(candidate, context["prompts"], context["tastes"], context["settings"],
                                    args.samples, context["eval_seed"]),
        "kl_per_token": cycle["evaluation"]["kl_per_token"],
        "rater_shares": cycle["rater_shares"],
    }
    (Path(args.out) / f"bound-{share:g}.json").write_text(json.dumps(result, indent=2))
    print(f"bound {label}: {json.dumps({k: v for k, v in result.items() if k != 'rater_shares'})}",
          file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.n_loud = max(1, round(args.loud * args.scale))
    args.n_quiet = max(1, round(args.quiet_thumbs * args.scale))
    Path(args.out).mkdir(parents=True, exist_ok=True)

    from chatbot.models import GenerationSettings
    from chatbot.starter import ensure_starter
    from online_rl.simulate import Bot, corpus_prompts
    from online_rl.tastes import resolve
    from storage import Store

    starter = str(ensure_starter(args.data_dir))
    settings = GenerationSettings()
    chat_prompts, heldout = corpus_prompts(args.seed, args.heldout)
    tastes = {args.quiet_taste: resolve(args.quiet_taste), args.loud_taste: resolve(args.loud_taste)}
    with tempfile.TemporaryDirectory(prefix="bench-poisoning-") as scratch:
        work = Path(scratch)
        store = Store.in_data_dir(work / "thumbs")
        bot = Bot(store, work / "thumbs", starter, args.device)
        started = time.perf_counter()
        ups = give_thumbs(store, bot, args, settings, chat_prompts)
        chat_s = time.perf_counter() - started
        print(f"thumbs given in {chat_s:.0f} s: {ups}", file=sys.stderr, flush=True)
        eval_seed = 10_000 + args.seed
        base_replies = [t for k in range(args.samples) for b in bot.sample(heldout, settings, eval_seed + k)
                        for t in b["texts"]]
        context = {"settings": settings, "prompts": heldout, "tastes": tastes, "eval_seed": eval_seed,
                   "replies": list(zip(heldout * args.samples, base_replies))}
        v0 = taste_approval(bot, heldout, tastes, settings, args.samples, eval_seed)
        store.close()
        results = [run_condition(label, share, work / "thumbs" / "chatbot.db", work, args, starter, context)
                   for label, share in BOUNDS]
    summary = {"args": {k: v for k, v in vars(args).items()}, "v0": v0, "thumbs_up": ups,
               "chat_s": round(chat_s, 1), "results": results}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_doc:
        write_doc(summary, args)
    return 0


def write_doc(summary: dict, args) -> None:
    quiet, loud = args.quiet_taste, args.loud_taste

    def approval(a: dict) -> str:
        return f"{a['approval']:.3f} ± {a['se']:.3f}"

    rows = [["v0 (before)", "", "", "", "", "", approval(summary["v0"][quiet]), approval(summary["v0"][loud]), "", ""]]
    for r in summary["results"]:
        share = r["loud_share"]
        by_taste = r["reward_auc_by_taste"]
        rows.append([r["bound"], f"{share['share_before']:.1%} → {share['share_after']:.1%}",
                     r["reward_best_epoch"], r["reward_auc_heldout"], by_taste[quiet], by_taste[loud],
                     approval(r["candidate"][quiet]), approval(r["candidate"][loud]), r["kl_per_token"],
                     f"{r['cycle_s']:.0f} s"])
    headers = ["rater bound", "loud rater's share of the thumbs (before → after)", "reward model's best epoch",
               "reward model AUC, held-out thumbs",
               f"reward model AUC by the quiet taste ({quiet})", f"reward model AUC by the loud taste ({loud})",
               f"candidate approval, quiet taste ({quiet})", f"candidate approval, loud taste ({loud})",
               "KL to base (nats/token)", "cycle"]
    scale = "" if args.scale == 1 else f" --scale {args.scale:g}"
    steps = f" --ppo-steps {args.ppo_steps}" if args.ppo_steps else ""
    steps += f" --method {args.method}" if args.method != METHODS[0] else ""
    epochs = f" --reward-epochs {args.reward_epochs}" if args.reward_epochs else ""
    body = table(headers, rows) + f"""

One rater gave {args.n_loud} thumbs by the `{loud}` taste; {args.quiet_raters} raters gave {args.n_quiet} each by
the `{quiet}` taste ({summary['thumbs_up']['loud']} and {summary['thumbs_up']['quiet']} thumbs up), chatting with
the starter (v0) through the store as the chat page does, a quarter of the turns regenerated ({summary['chat_s']:.0f} s
of chat). The same database then went through one `{args.method}` retrain cycle with the rater bound and one without
(`max_rater_share` 1.0), seed {args.seed}, both training a policy whatever the reward model's held-out AUC,
without the gate. *Best epoch* 0 means that no epoch of training lowered the reward model's held-out
loss, and the untrained start was kept. *Reward model AUC by a taste*: how well the policy's reward model ranks v0's replies to
{args.heldout} held-out prompts ({args.samples} each) by that taste's verdicts (0.5: no better than chance).
*Candidate approval*: the share of the candidate's replies to the same prompts each taste likes, with its
standard error over prompts. *Reward model AUC, held-out thumbs* is the cycle's own figure, over both groups'
held-out thumbs ({' and '.join(str(r['reward_auc_heldout']) for r in summary['results'])}), which contradict each
other whatever the reward model learned; with the cycle's usual wait for a reward model whose interval there
lies above 0.5, a run on these thumbs is refused. *Cycle*: the retrain's wall time on this machine, which was
shared with other jobs.
"""
    write_section("poisoning", "Poisoning: one loud rater against many quiet ones (starter model, CPU)",
                  f"python benchmarks/bench_poisoning.py --data-dir {args.data_dir}{scale}{steps}{epochs}", body)


if __name__ == "__main__":
    sys.exit(main())
