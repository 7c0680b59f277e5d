"""Learning from simulated thumbs: approval, KL and the replies, per round.

Runs `python -m online_rl.simulate` for each preference and method (by
default `concise` and `asks_back`, PPO and KTO, 5 rounds of 100 thumbs) on
the starter model, each in a fresh data directory, and writes:

- the approval curve, KL to the base, share of real words, distinct replies
  and wall time per round into docs/benchmarks.md (section "learning"),
  beside held-out reward-model AUC and a few replies before and after;
- the curves as docs/learning.png.

    python benchmarks/bench_learning.py [--rounds 5] [--per-round 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def run_one(preference, method, args, starter: Path, out_dir: Path) -> dict:
    out = out_dir / f"{preference}-{method}.json"
    with tempfile.TemporaryDirectory(prefix=f"sim-{preference}-{method}-") as data_dir:
        cmd = [sys.executable, "-m", "online_rl.simulate", "--preference", preference, "--method", method,
               "--rounds", str(args.rounds), "--per-round", str(args.per_round), "--seed", str(args.seed),
               "--data-dir", data_dir, "--model", str(starter), "--out", str(out)]
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        started = time.perf_counter()
        log = out_dir / f"{preference}-{method}.log"
        with open(log, "w") as fp:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fp, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation {preference}/{method} failed, see {log}")
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in results:
        label = f"{r['preference']} / {r['method']}"
        style = "-" if r["method"] == "ppo" else "--"
        rounds = list(range(len(r["approval"])))
        axes[0].plot(rounds, r["approval"], style, marker="o", label=label)
        axes[1].plot(rounds[1:], r["kl"], style, marker="o", label=label)
        axes[2].plot(rounds, r["known_words"], style, marker="o", label=label)
    axes[0].set(title="approval on held-out prompts", xlabel="round", ylabel="share of replies liked", ylim=(0, 1))
    axes[1].set(title="KL to the base (nats per reply)", xlabel="round")
    axes[2].set(title="share of real words in replies", xlabel="round", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--preferences", default="concise,asks_back")
    parser.add_argument("--methods", default="ppo,kto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="benchmarks/results", help="JSON and logs of each simulation")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render-only", action="store_true",
                        help="write the report from the JSON already in --out-dir, without simulating")
    args = parser.parse_args()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(p, m) for p in args.preferences.split(",") for m in args.methods.split(",")]
    if args.render_only:
        results = [json.loads((out_dir / f"{p}-{m}.json").read_text()) for p, m in pairs]
    else:
        from chatbot.starter import ensure_starter

        starter = ensure_starter(args.data_dir)
        results = [run_one(p, m, args, starter, out_dir) for p, m in pairs]

    fmt = lambda xs: " → ".join("–" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
    rows = []
    for r in results:
        gain = r["approval"][-1] - r["approval"][0]
        rows.append([r["preference"], r["method"].upper(), fmt(r["approval"]), f"**{gain:+.2f}**", fmt(r["kl"]),
                     fmt(r["known_words"]), fmt(r["distinct_fraction"]), fmt(r["reward_auc"]),
                     f"{sum(r['wall_s']) / len(r['wall_s']):.0f} s"])
    body = table(["preference", "method", "approval, before → after each round", "gain",
                  "KL to base per round (nats)", "real words", "distinct replies", "reward-model AUC",
                  "wall per round"], rows)
    body += (f"\n\n{args.rounds} rounds of {args.per_round} thumbs, seed {args.seed}; approval on "
             f"{results[0]['heldout_prompts']} held-out corpus prompts × {results[0]['samples_per_prompt']} "
             "samples at the serving defaults (temperature 0.8, top-p 0.95). KL is the candidate's, estimated on "
             "its own samples on held-out user prompts. *Real words* is the share of reply words found in the "
             "corpus: it falls when a policy wins approval with made-up words. A KTO run reuses the reward "
             "model only to judge, so its AUC is that of the first one trained.\n\n"
             "![learning curves](learning.png)\n")
    for r in results:
        body += f"\n**{r['preference']} / {r['method'].upper()}: replies to held-out prompts, before → after**\n\n"
        before, after = r["samples"][0], r["samples"][-1]
        body += table(["prompt", "before (v0)", f"after ({r['versions'][-1]})"],
                      [[b["prompt"][:50], f"{b['reply'][:60]} {'👍' if b['liked'] else '👎'}",
                        f"{a['reply'][:60]} {'👍' if a['liked'] else '👎'}"]
                       for b, a in list(zip(before, after))[:5]])
        body += "\n"
    print(body)
    if not args.no_write:
        plot(results, ROOT / "docs" / "learning.png")
        write_section("learning", "Learning from simulated users (starter model)",
                      f"python benchmarks/bench_learning.py --rounds {args.rounds} --per-round {args.per_round} "
                      f"--seed {args.seed}", body)


if __name__ == "__main__":
    main()
