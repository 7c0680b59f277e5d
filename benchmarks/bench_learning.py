"""The taste suite: does the whole loop, gate included, learn every taste?

Runs `python -m online_rl.simulate` for each taste (default: every built-in
one, `online_rl/tastes.py`) at each seed and noise level, each in a fresh
data directory, and writes into docs/benchmarks.md (section "learning"):

- per run: approval on the true taste before and after each round, with its
  standard error; the gate's decision each round; the KL to the base per
  token; the base model's NLL per token and the known-word share of the
  served replies, beside the base's own; the gain and the goals it is held
  to (+0.15 or ending at 0.90; never below the start; language kept);
- how many promoted candidates were truly worse than the version they
  replaced (their approval, measured on the true taste, below it by more
  than two standard errors), and how many were lower at all;
- replies before and after, to be read;
- the curves as docs/learning.png, drawn from the table
  (`benchmarks/learning_figure.py`).

    python benchmarks/bench_learning.py [--tastes all] [--rounds 5] [--per-round 100] \\
        [--seeds 0] [--noise 0] [--extra "long:1:0.2,computers:1:0"] [--method tilt]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.learning_figure import draw, table_rows  # noqa: E402
from benchmarks.report import table, write_section  # noqa: E402
from online_rl import METHODS  # noqa: E402


def run_one(taste: str, seed: int, noise: float, args, starter: Path, out_dir: Path) -> dict:
    name = f"{args.method}-{taste}-s{seed}-n{noise:g}"
    out = out_dir / f"{name}.json"
    if args.reuse and out.exists():
        return json.loads(out.read_text())
    kept = out_dir / f"{name}-data"
    if args.keep_data:
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
    with contextlib.nullcontext(str(kept)) if args.keep_data else tempfile.TemporaryDirectory(
            prefix=f"sim-{name}-") as data_dir:
        cmd = [sys.executable, "-m", "online_rl.simulate", "--preference", taste, "--rounds", str(args.rounds),
               "--per-round", str(args.per_round), "--seed", str(seed), "--noise", str(noise),
               "--method", args.method, "--data-dir", data_dir, "--model", str(starter), "--out", str(out)]
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        started = time.perf_counter()
        with open(out_dir / f"{name}.log", "w") as fp:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fp, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation {name} failed, see {out_dir / (name + '.log')}")
        print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        result = json.loads(out.read_text())
        result["commit"] = commit()
        out.write_text(json.dumps(result))
    return json.loads(out.read_text())


def commit() -> str:
    """The commit the code ran at, so that a table built from runs of several commits says which is which."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def verdicts(r: dict) -> dict:
    """The goals of the suite, judged on one run."""
    approval, se = r["approval"], r["approval_se"]
    gain = approval[-1] - approval[0]
    base_nll, base_known = r["base_nll"][0], r["known_words"][0]
    drops = [i for i in range(1, len(approval)) if approval[i] < approval[i - 1] - 2 * max(se[i], se[i - 1])]
    worse = lower = promoted = 0
    for i, d in enumerate(r["decisions"]):
        cand = r["candidate_approval"][i]
        if d["decision"] == "promoted" and cand:
            promoted += 1
            before = approval[i]
            lower += cand["approval"] < before
            worse += cand["approval"] < before - 2 * max(cand["se"], se[i])
    # The gate's rule: the excess NLL per token at most a tenth of the base's
    # NLL per token above the base's own (runs from before the excess was
    # measured: the plain NLL per token at most 10% above the base's).
    excess = r.get("excess_nll") or [None] * len(r["base_nll"])
    ceiling = None if excess[0] is None else excess[0] + 0.10 * base_nll
    language = all((k is None or k >= 0.92) and (n is None or (n <= 1.10 * base_nll if ceiling is None else
                                                               (e is None or e <= ceiling)))
                   for n, e, k in zip(r["base_nll"][1:], excess[1:], r["known_words"][1:]))
    return {"gain": gain, "learned": gain >= 0.15 or approval[-1] >= 0.90, "not_below": approval[-1] >= approval[0],
            "drops": len(drops), "language": language, "promoted": promoted, "worse": worse, "lower": lower,
            "base_nll": base_nll, "base_known": base_known}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--tastes", default="all", help="comma-separated built-in tastes, or all")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0], help="how each retrain updates the policy")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--noise", default="0", help="comma-separated noise levels for every taste")
    parser.add_argument("--extra", default="", help="more runs as taste:seed:noise, comma-separated")
    parser.add_argument("--out-dir", default="benchmarks/results", help="JSON and logs of each simulation")
    parser.add_argument("--reuse", action="store_true", help="keep results already in --out-dir")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep each simulation's data directory (database, adapters) in --out-dir as NAME-data, "
                             "to read its versions' replies afterwards")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from online_rl.tastes import TASTES

    tastes = list(TASTES) if args.tastes == "all" else args.tastes.split(",")
    runs = [(t, int(s), float(n)) for t in tastes for s in args.seeds.split(",") for n in args.noise.split(",")]
    for spec in filter(None, args.extra.split(",")):
        taste, seed, noise = spec.split(":")
        runs.append((taste, int(seed), float(noise)))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from chatbot.starter import ensure_starter

    starter = ensure_starter(args.data_dir)
    results = [run_one(t, s, n, args, starter, out_dir) for t, s, n in runs]

    fmt = lambda xs: " → ".join("–" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
    rows, totals = [], {"promoted": 0, "worse": 0, "lower": 0}
    for r in results:
        v = verdicts(r)
        for key in totals:
            totals[key] += v[key]
        decisions = " ".join({"promoted": "P", "rejected": "R", "waiting": "W"}[d["decision"]]
                             for d in r["decisions"])
        rows.append([
            r["preference"], r["seed"], f"{r['noise']:g}",
            fmt(r["approval"]) + f" (± {max(r['approval_se']):.2f})", f"**{v['gain']:+.2f}**",
            "yes" if v["learned"] else "**no**", "yes" if v["not_below"] else "**no**", decisions,
            fmt(r["kl_per_token"]), fmt(r["base_nll"]), fmt(r.get("excess_nll") or []) or "not measured",
            fmt(r["known_words"]),
            f"{r['distinct_fraction'][0]:.2f} → {r['distinct_fraction'][-1]:.2f}" + (
                f"; top ten {r['top10_share'][0]:.0%} → {r['top10_share'][-1]:.0%}" if r.get("top10_share") else ""),
            "yes" if v["language"] else "**no**", f"{sum(r['wall_s']) / len(r['wall_s']):.0f} s",
            r.get("commit", "unknown"),
        ])
    body = table(["taste", "seed", "noise", "approval per round (largest SE)", "gain", "+0.15 or ≥ 0.90",
                  "not below start", "gate per round", "KL/token of the served version", "base NLL/token",
                  "excess NLL/token", "known words", "distinct replies (first → last)", "language kept", "wall per round", "commit"], rows)
    body += (f"\n\nGate per round: P promoted, R rejected, W waiting for more feedback (reward model no better "
             f"than chance). Promoted candidates: {totals['promoted']}; of them truly worse than the version "
             f"they replaced (true approval lower by more than two standard errors): **{totals['worse']}**; "
             f"lower at all: {totals['lower']}.\n\n"
             f"Method `{args.method}`; {args.rounds} rounds of {args.per_round} thumbs from 5 raters; approval on "
             f"{results[0]['heldout_prompts']} held-out corpus prompts × {results[0]['samples_per_prompt']} replies "
             "at the serving settings (temperature 0.8, top-p 0.95, 96 tokens), always on the true taste; "
             "round 0 is the base. *Excess NLL/token*: the base's NLL of each reply token less what its own "
             "choice costs it at the same position (0 for the base; docs/learning.md). *Language kept*, the "
             "gate's rule: every round's excess NLL per token at most a tenth of the base's NLL per token above "
             "the base's own, and known words ≥ 0.92 (runs before the excess was measured: base NLL per token at "
             "most 10% above the base's). *Distinct replies*: the share of distinct replies among all the "
             "held-out replies (fewer: the bot gives one reply to more prompts); *top ten*: the share of them "
             "that are one of the ten most common (runs from 2026-11-30 on).\n")
    missing = [t for t in TASTES if t not in {r["preference"] for r in results}]
    if missing:
        body += f"\n**Not measured in this run:** {', '.join(f'`{t}`' for t in missing)}.\n"
    body += "\n![learning curves](learning.png)\n"
    for r in results:
        before, after = r["samples"][0], r["samples"][-1]
        body += (f"\n**{r['preference']} (seed {r['seed']}, noise {r['noise']:g}): replies to held-out prompts, "
                 f"v0 → {r['versions'][-1]}**\n\n")
        body += table(["prompt", "before (v0)", f"after ({r['versions'][-1]})"],
                      [[b["prompt"][:50], f"{b['reply'][:60]} {'👍' if b['liked'] else '👎'}",
                        f"{a['reply'][:60]} {'👍' if a['liked'] else '👎'}"]
                       for b, a in list(zip(before, after))[:8]])
        body += "\n"
    print(body)
    if not args.no_write:
        write_section("learning", "The taste suite: learning from simulated users (starter model)",
                      "python benchmarks/bench_learning.py " + " ".join(sys.argv[1:]), body)
        draw(table_rows())


if __name__ == "__main__":
    main()
