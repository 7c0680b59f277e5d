"""One retrain cycle on 500 feedback rows: wall time, peak memory, adapter size.

Fills a scratch data directory with 500 thumbs from a simulated user (the
`concise` preference, the starter model at v0, through the same store calls
as the chat page), then runs `python app.py retrain --method M` as a child
process for KTO, PPO and the tilt, each on a copy of that database, and reads the
child's peak resident memory from the kernel (`wait4`).

    python benchmarks/bench_retrain.py [--rows 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def _training(train: dict) -> str:
    """What the policy update did: PPO or KTO steps, the tilt's epochs."""
    if train.get("method") == "tilt":
        return f"{train.get('epochs')} epochs, epoch {train.get('epoch_kept')} kept"
    return f"{train.get('steps')} steps"


def fill(data_dir: Path, starter: Path, rows: int, seed: int) -> None:
    from chatbot.models import GenerationSettings
    from online_rl.simulate import Bot, chat_round, corpus_prompts
    from online_rl.tastes import concise
    from storage import Store

    store = Store.in_data_dir(data_dir)
    bot = Bot(store, data_dir, str(starter), "cpu")
    prompts, _ = corpus_prompts(seed, 100)
    chat_round(store, bot, concise, prompts, rows, GenerationSettings(), random.Random(seed), session="bench",
               regenerate=0.25)
    store.close()


def retrain(data_dir: Path, starter: Path, method: str) -> tuple[dict, float, float]:
    cmd = [sys.executable, str(ROOT / "app.py"), "retrain", "--method", method, "--data-dir", str(data_dir),
           "--model", str(starter)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    # communicate() has reaped the child; its peak memory is in the children's usage.
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        raise RuntimeError(f"retrain --method {method} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from chatbot.starter import ensure_starter

    starter = ensure_starter(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as scratch:
        filled = Path(scratch) / "filled"
        fill(filled, starter, args.rows, args.seed)
        # Each method gets its own copy of the database and is run in a fresh
        # child process, one after the other; a child's peak memory is read
        # from RUSAGE_CHILDREN, which is the largest so far, so the smaller
        # runs go first (the tilt holds 4,096 sampled replies at once).
        for method in ("kto", "ppo", "tilt"):
            data_dir = Path(scratch) / method
            shutil.copytree(filled, data_dir)
            summary, wall, peak = retrain(data_dir, starter, method)
            print(f"{method}: {wall:.0f} s, peak {peak:.0f} MiB", file=sys.stderr)
            rows.append([method.upper(), summary["feedback"]["examples"], f"{wall:.0f} s",
                         f"{summary['seconds']:.0f} s", f"{peak:.0f} MiB", f"{summary['adapter_mb']:.2f} MB",
                         f"{summary['base_mb']:.2f} MB",
                         (summary.get("reward_model") or {}).get("auc"),
                         summary["evaluation"]["win_rate"], summary["evaluation"]["kl_per_token"],
                         _training(summary.get("train") or {})])
    body = table(["method", "rated replies", "wall (process)", "cycle", "peak RSS", "adapter", "base model",
                  "reward AUC", "win rate vs v0", "KL to base (nats/token)", "training"], rows)
    body += (f"\n\n{args.rows} thumbs from the simulated `concise` user on v0 (a quarter of turns regenerated); "
             "`python app.py retrain --method M` as a child process on this CPU with default settings "
             "(two reward models, each stopped on held-out loss; PPO up to 30 steps of 4 prompts x 16 replies "
             "sampled as the bot serves, up to 96 tokens; KTO 3 epochs at batch 16; the tilt 512 prompts x 8 "
             "replies, up to 3 epochs). *Wall* includes "
             "starting Python and importing torch; *cycle* is the run's own time. Peak RSS is the child's "
             "maximum resident memory. The adapter is the LoRA (r=16 on every linear layer) in safetensors; "
             f"the base is the starter model's directory. Cores: {os.cpu_count()}.")
    print(body)
    if not args.no_write:
        write_section("retrain", "One retrain cycle on 500 feedback rows (starter model, CPU)",
                      "python benchmarks/bench_retrain.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
