"""Poisoning: can one rater with many thumbs outvote many raters with a few each?

One loud rater gives `--loud` thumbs by one taste (default `concise`);
`--quiet-raters` raters give `--quiet-thumbs` each by the opposite taste
(default `long`). The thumbs arrive over `--rounds` rounds, as they would in
service: each round every rater chats with the version active at the time
and rates its replies through the same `Store` calls as the chat page
(`online_rl.simulate.chat_round`: a quarter of the turns regenerated, which
is how pairs arise), then one retrain cycle runs as deployed: it waits while
the reward model is not informative, and the gate decides. The whole run is
done twice from the same start, with the rater bound (`max_rater_share` 5%)
and without it (1.0). For each:

- every round's decision (promoted, rejected with the gate's reason, or
  waiting for more feedback) and the reward model's held-out AUC;
- the loud rater's share of the thumbs before and after the bound;
- how well the last policy reward model ranks fresh v0 replies to held-out
  prompts by each taste (AUC against each taste's verdicts);
- the approval of the version serving after each round under each taste
  (with its standard error) on held-out prompts, beside v0's.

    python benchmarks/bench_poisoning.py --data-dir /work/cache            # 1,000 against 20 x 50, 3 rounds
    python benchmarks/bench_poisoning.py --data-dir /work/cache --scale 0.1 --rounds 1   # a tiny budget
"""

from __future__ import annotations

import argparse
import json
import random
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
    parser.add_argument("--rounds", type=int, default=3, help="the thumbs arrive in this many rounds, a cycle after each")
    parser.add_argument("--loud-taste", default="concise")
    parser.add_argument("--quiet-taste", default="long")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0], help="how the cycle updates the policy")
    parser.add_argument("--ppo-steps", type=int, help="PPO steps per cycle (default: the cycle's)")
    parser.add_argument("--reward-epochs", type=int, help="most reward-model epochs (default: the cycle's)")
    # 200 × 3, as the taste suite: a gain of 0.10 measured on 100 × 2 has a
    # standard error of about 0.05, too wide to tell +0.05 from the goal.
    parser.add_argument("--heldout", type=int, default=200, help="held-out prompts (default 200)")
    parser.add_argument("--samples", type=int, default=3, help="replies per held-out prompt (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=[label.split()[0] for label, _ in BOUNDS],
                        help="run one condition of the rater bound (with --no-doc: the section shows both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench-poisoning", help="per-condition JSON and logs go here")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--reuse", action="store_true",
                        help="write docs/benchmarks.md from the summary.json already in --out, without simulating")
    return parser


def give_thumbs(store, bot, args, settings, prompts: list[str], rnd: int) -> dict:
    """One round's thumbs: the loud rater's, then each quiet rater's; thumbs-up counts."""
    from online_rl.simulate import chat_round
    from online_rl.tastes import resolve

    def share(total: int) -> int:  # this round's part of `total`, the rounds adding up to it
        return total * (rnd + 1) // args.rounds - total * rnd // args.rounds

    rng = random.Random(args.seed * 1000 + rnd)
    loud, quiet = resolve(args.loud_taste), resolve(args.quiet_taste)
    ups = {"loud": chat_round(store, bot, loud, prompts, share(args.n_loud), settings, rng, session="loud",
                              regenerate=0.25)}
    ups["quiet"] = sum(chat_round(store, bot, quiet, prompts, share(args.n_quiet), settings, rng,
                                  session=f"quiet{i:02d}", regenerate=0.25) for i in range(args.quiet_raters))
    return ups


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


def run_condition(label: str, share: float, work: Path, args, starter: str, context: dict) -> dict:
    """The rounds of thumbs and cycles with one rater bound, from v0."""
    import torch

    from chatbot.models import load_tokenizer
    from online_rl.cycle import CycleConfig, NotEnoughFeedback, run_cycle
    from online_rl.simulate import Bot
    from storage import Store

    data_dir = work / f"bound-{share:g}"
    store = Store.in_data_dir(data_dir)
    rounds, ups = [], {"loud": 0, "quiet": 0}
    started = time.perf_counter()
    with open(Path(args.out) / f"bound-{share:g}.log", "w") as log:
        for rnd in range(args.rounds):
            bot = Bot(store, data_dir, starter, args.device)
            given = give_thumbs(store, bot, args, context["settings"], context["chat_prompts"], rnd)
            ups = {k: ups[k] + given[k] for k in ups}
            print(f"round {rnd + 1}: thumbs given to {bot.version}, up: {given}", file=log, flush=True)
            config = CycleConfig(method=args.method, device=args.device, seed=args.seed + rnd,
                                 generation=context["settings"], promote=True)
            config.data.max_rater_share = share
            if args.ppo_steps:
                config.ppo.steps = args.ppo_steps
            if args.reward_epochs:
                config.reward.epochs = args.reward_epochs
            try:
                cycle = run_cycle(store, data_dir=data_dir, model_name=starter, config=config,
                                  progress=lambda line, r=rnd: print(f"round {r + 1}: {line}", file=log, flush=True))
            except NotEnoughFeedback as exc:
                run = store.runs(limit=1)[0]
                rounds.append({"decision": "waiting", "reason": str(exc),
                               "reward_auc": ((run.get("metrics") or {}).get("reward_model") or {}).get("auc")})
                continue
            promoted = store.active_version() == cycle["version"]
            serving = Bot(store, data_dir, starter, args.device)
            rounds.append({"decision": "promoted" if promoted else "rejected", "version": cycle["version"],
                           "approval": taste_approval(serving, context["prompts"], context["tastes"],
                                                      context["settings"], args.samples, context["eval_seed"]),
                           "reason": cycle["gate"]["reason"], "reward_auc": cycle["reward_model"]["auc"],
                           "kl_per_token": cycle["evaluation"]["kl_per_token"],
                           "loud_share": next(r for r in cycle["rater_shares"]["thumbs"]["top"]
                                              if r["rater"] == "session:loud"),
                           "reward_model_path": cycle["reward_model_path"]})
    wall = time.perf_counter() - started
    active = Bot(store, data_dir, starter, args.device)
    trained = [r for r in rounds if "reward_model_path" in r]
    result = {
        "bound": label, "max_rater_share": share, "rounds": rounds, "thumbs_up": ups, "wall_s": round(wall, 1),
        "active": active.version,
        "approval": taste_approval(active, context["prompts"], context["tastes"], context["settings"],
                                   args.samples, context["eval_seed"]),
        "reward_auc_by_taste": reward_model_auc(trained[-1]["reward_model_path"], starter, load_tokenizer(starter),
                                                context["replies"], context["tastes"], torch.device(args.device))
        if trained else None,
    }
    store.close()
    (Path(args.out) / f"bound-{share:g}.json").write_text(json.dumps(result, indent=2))
    print(f"bound {label}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.only and not args.no_doc and not args.reuse:
        raise SystemExit("--only runs one condition; add --no-doc (the section in docs/benchmarks.md shows both)")
    args.n_loud = max(1, round(args.loud * args.scale))
    args.n_quiet = max(1, round(args.quiet_thumbs * args.scale))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.reuse:
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        write_doc(summary, argparse.Namespace(**{**summary["args"], "data_dir": args.data_dir}))
        return 0

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
        store = Store.in_data_dir(work / "v0")
        bot = Bot(store, work / "v0", starter, args.device)
        eval_seed = 10_000 + args.seed
        base_replies = [t for k in range(args.samples) for b in bot.sample(heldout, settings, eval_seed + k)
                        for t in b["texts"]]
        context = {"settings": settings, "prompts": heldout, "tastes": tastes, "eval_seed": eval_seed,
                   "chat_prompts": chat_prompts, "replies": list(zip(heldout * args.samples, base_replies))}
        v0 = taste_approval(bot, heldout, tastes, settings, args.samples, eval_seed)
        store.close()
        results = [run_condition(label, share, work, args, starter, context) for label, share in BOUNDS
                   if args.only in (None, label.split()[0])]
    summary = {"args": {k: v for k, v in vars(args).items()}, "v0": v0, "results": results}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_doc:
        write_doc(summary, args)
    return 0


def write_doc(summary: dict, args) -> None:
    quiet, loud = args.quiet_taste, args.loud_taste

    def approval(a: dict) -> str:
        return f"{a['approval']:.3f} ± {a['se']:.3f}"

    def gain(r: dict, taste: str) -> str:
        return f"{r['approval'][taste]['approval'] - summary['v0'][taste]['approval']:+.3f}"

    rows = [["v0 (before)", "", "", "", "", approval(summary["v0"][quiet]), "", approval(summary["v0"][loud]), "",
             "", ""]]
    for r in summary["results"]:
        shares = [x["loud_share"] for x in r["rounds"] if "loud_share" in x]
        share = f"{shares[-1]['share_before']:.1%} → {shares[-1]['share_after']:.1%}" if shares else ""
        decisions = " ".join(x["decision"][0].upper() for x in r["rounds"])
        path = {t: [summary["v0"][t]["approval"]] for t in (quiet, loud)}
        for x in r["rounds"]:
            for t in path:
                path[t].append(x["approval"][t]["approval"] if "approval" in x else path[t][-1])
        aucs = " → ".join("n/a" if x["reward_auc"] is None else f"{x['reward_auc']:.2f}" for x in r["rounds"])
        by_taste = r["reward_auc_by_taste"] or {}
        rows.append([r["bound"], share, f"{decisions} ({r['active']} serving)", aucs,
                     f"{by_taste.get(quiet, 'n/a')} / {by_taste.get(loud, 'n/a')}",
                     approval(r["approval"][quiet]), gain(r, quiet), approval(r["approval"][loud]), gain(r, loud),
                     " → ".join(f"{a:.2f}" for a in path[quiet]), " → ".join(f"{a:.2f}" for a in path[loud])])
    headers = ["rater bound", "loud rater's share of the thumbs (before → after)", "decisions per round",
               "reward model AUC on held-out thumbs, per round (rater-bound weights)",
               f"last reward model's AUC by the quiet taste ({quiet}) / by the loud one ({loud})",
               f"approval, quiet taste ({quiet})", "gain", f"approval, loud taste ({loud})", "gain",
               f"{quiet}, per round", f"{loud}, per round"]
    reasons = "\n".join(f"- {r['bound']}, round {i + 1}: {x['decision']}: {x['reason']}"
                        for r in summary["results"] for i, x in enumerate(r["rounds"]))
    scale = "" if args.scale == 1 else f" --scale {args.scale:g}"
    steps = f" --ppo-steps {args.ppo_steps}" if args.ppo_steps else ""
    steps += f" --method {args.method}" if args.method != METHODS[0] else ""
    steps += f" --rounds {args.rounds}" if args.rounds != 3 else ""
    epochs = f" --reward-epochs {args.reward_epochs}" if args.reward_epochs else ""
    ups = "; ".join(f"{r['bound']}: {r['thumbs_up']['loud']} and {r['thumbs_up']['quiet']}" for r in summary["results"])
    wall = ", ".join(f"{r['wall_s'] / 60:.0f} min" for r in summary["results"])
    body = table(headers, rows) + f"""

One rater gave {args.n_loud} thumbs by the `{loud}` taste; {args.quiet_raters} raters gave {args.n_quiet} each by
the `{quiet}` taste (thumbs up from each group: {ups}). The thumbs arrived in {args.rounds} rounds: each round every
rater chatted with the version serving at the time through the store as the chat page does (a quarter of
the turns regenerated), then one `{args.method}` retrain cycle ran as deployed, seed {args.seed}: it waits while no
reward model is better than chance on thumbs it never saw (held-out, judge, both pooled or cross-validated: docs/learning.md),
and the gate decides (P promoted, R rejected, W waiting for more feedback). *Approval*: the share of the replies of the version serving after the last
round, on {args.heldout} held-out prompts × {args.samples}, that each taste likes, with its standard error over
prompts; *gain* against v0 on the same prompts; *per round*: the same figure for the version serving after
each round. The AUCs by taste say how well the last policy reward
model ranks v0's replies to those prompts by each taste's verdicts (0.5: chance). Wall time: {wall}.

Each round's decision:

{reasons}
"""
    write_section("poisoning", "Poisoning: one loud rater against many quiet ones (starter model, CPU)",
                  f"python benchmarks/bench_poisoning.py --data-dir {args.data_dir}{scale}{steps}{epochs}", body)


if __name__ == "__main__":
    sys.exit(main())
