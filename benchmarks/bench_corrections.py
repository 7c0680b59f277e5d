"""Corrections: does a person who writes better replies teach the bot with fewer rated replies?

Two simulated users with the same taste, seed and thumbs go through the whole
loop (`online_rl.simulate`: chat, thumbs, retrain, gate, promotion): one only
clicks; the other also writes a better reply on `--corrections` of their
thumbs-down (`online_rl.simulate.correction_for`: a corpus reply their taste
likes, on the prompt's topic), which the cycle turns into a preference pair
and a supervised target. Approval (true taste, held-out prompts) after each
round is read against the rated replies given so far; the ratio is the rated
replies the correcting user needed to reach the approval the clicking user
ended on, over the clicking user's. When the clicking user's approval did
not rise by two standard errors, there is nothing to reach and no ratio.

    python benchmarks/bench_corrections.py --data-dir /work/cache
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--preference", default="long")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--corrections", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    return parser


def thumbs_to_reach(target: float, approvals: list[float], per_round: int) -> float | None:
    """Rated replies at which the approval curve first reaches `target`,
    linearly between rounds; None if it never does."""
    for r in range(1, len(approvals)):
        lo, hi = approvals[r - 1], approvals[r]
        if hi >= target:
            share = 1.0 if hi == lo else (target - lo) / (hi - lo)
            return round(per_round * (r - 1 + max(0.0, min(1.0, share))), 1)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from chatbot.models import resolve_model_path
    from online_rl import simulate

    starter = Path(resolve_model_path("starter", args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="bench-corrections-"))
    runs = {}
    for label, share in (("clicks only", 0.0), (f"corrects {args.corrections:.0%} of thumbs-down", args.corrections)):
        data = work / ("clicks" if share == 0 else "corrects")
        (data / "models").mkdir(parents=True)
        (data / "models" / "starter").symlink_to(starter)
        out = data / "result.json"
        simulate.main(["--preference", args.preference, "--rounds", str(args.rounds), "--per-round",
                       str(args.per_round), "--seed", str(args.seed), "--corrections", str(share),
                       "--heldout", str(args.heldout), "--data-dir", str(data), "--device", "cpu",
                       "--out", str(out)])
        result = json.loads(out.read_text())
        from storage import Store

        result["corrections_given"] = sum(1 for r in Store.in_data_dir(data).feedback_since(0) if r["correction"])
        runs[label] = result
    body = report(runs, args)
    print(body)
    if not args.no_write:
        write_section("corrections", "Corrections: rated replies needed with and without them",
                      "python benchmarks/bench_corrections.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      body)
    return 0


def report(runs: dict, args) -> str:
    (click_label, clicks), (fix_label, fixes) = runs.items()
    rows = []
    for label, r in runs.items():
        curve = " → ".join(f"{a:.2f}" for a in r["approval"])
        decisions = " ".join(d["decision"][0].upper() for d in r["decisions"])
        rows.append([label, r["corrections_given"], curve, f"± {max(r['approval_se']):.2f}", decisions,
                     " → ".join(f"{k:.2f}" for k in r["known_words"]),
                     " → ".join(f"{n:.3f}" for n in r["base_nll"])])
    start, end, se = clicks["approval"][0], clicks["approval"][-1], max(clicks["approval_se"])
    if end - start >= 2 * se:
        need_clicks = thumbs_to_reach(end, clicks["approval"], args.per_round)
        need_fixes = thumbs_to_reach(end, fixes["approval"], args.per_round)
        verdict = (f"Target: the clicking user's final approval {end:.2f}. Rated replies to reach it: clicks only "
                   f"{need_clicks}, with corrections "
                   + (f"{need_fixes}: ratio **{need_fixes / need_clicks:.2f}**." if need_fixes is not None
                      else "never, within the rounds run: **no ratio**; the corrections did not help."))
    else:
        verdict = (f"**No ratio**: the clicking user's approval moved {start:.2f} → {end:.2f}, less than two "
                   f"standard errors ({2 * se:.2f}): there is no approval gained to reach. With corrections it "
                   f"moved {fixes['approval'][0]:.2f} → {fixes['approval'][-1]:.2f}.")
    return (f"Taste `{args.preference}`, seed {args.seed}, {args.rounds} rounds × {args.per_round} rated replies from "
            f"5 raters, the whole loop with the gate; approval on {args.heldout} held-out prompts × 3 replies, on "
            f"the true taste. Decisions: P promoted, R rejected, W waiting for more feedback.\n\n"
            + table(["user", "corrections written", "approval per round", "largest SE", "decisions",
                     "known words", "base NLL/token"], rows)
            + "\n\n" + verdict)


if __name__ == "__main__":
    raise SystemExit(main())
