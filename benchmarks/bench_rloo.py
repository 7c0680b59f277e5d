"""Our PPO against TRL's RLOOTrainer, side by side on one reward model.

Both train a fresh LoRA (r=16 on every linear layer) on the starter model
against the same reward model (trained here on thumbs from a simulated user
of the chosen taste), on the same prompts, sampling replies as the bot
serves (temperature 0.8, top-p 0.95, up to 96 tokens) with our PPO's group
size and rollouts per step, for the same number of steps. TRL's trainer gets the plain base and a
`peft_config`, so that its reference is the base with the adapter disabled,
as ours is. Measured for each, on held-out prompts: approval on the true
taste (with its standard error), the reward model's mean logit, KL to the
base per token, the base model's NLL per token of the replies and their
known-word share, and wall time.

    python benchmarks/bench_rloo.py [--taste long] [--thumbs 300] [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def measure(model, tokenizer, prompts, taste, rm, settings, seed=7, samples=2) -> dict:
    import torch

    from online_rl.language import base_nll_per_token, known_word_fraction
    from online_rl.sampling import reply_logprobs, sample_many
    from online_rl.simulate import approval_and_se

    torch.manual_seed(seed)
    messages = [[{"role": "user", "content": p}] for p in prompts] * samples
    batches = sample_many(model, tokenizer, messages, settings)
    texts = [t for b in batches for t in b["texts"]]
    liked = [bool(taste(m[-1]["content"], t)) for m, t in zip(messages, texts)]
    share, se = approval_and_se(liked, len(prompts))
    kl = tokens = 0.0
    if hasattr(model, "disable_adapter"):
        for b in batches:
            own = reply_logprobs(model, b, settings.temperature)
            with model.disable_adapter():
                ref = reply_logprobs(model, b, settings.temperature)
            kl += float((own - ref).sum())
            tokens += float(b["reply_mask"].sum())
    scores = rm.score(messages, texts)
    return {"approval": round(share, 3), "se": round(se, 3),
            "rm": round(sum(scores) / len(scores), 3), "kl_per_token": round(kl / max(tokens, 1), 4),
            "base_nll": base_nll_per_token(model, batches, settings), "known_words": known_word_fraction(texts),
            "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 2), "examples": texts[:3]}


def reward_model(starter: Path, taste_name: str, thumbs: int, seed: int, scratch: Path):
    """Thumbs from a simulated user of the taste on v0, then the policy's reward model."""
    import torch

    from chatbot.models import GenerationSettings
    from online_rl.data import snapshot
    from online_rl.reward import RewardConfig, train_reward_model
    from online_rl.simulate import Bot, chat_round, corpus_prompts
    from online_rl.tastes import resolve
    from storage import Store

    store = Store.in_data_dir(scratch)
    bot = Bot(store, scratch, str(starter), "cpu")
    chat, _ = corpus_prompts(seed, 200)
    chat_round(store, bot, resolve(taste_name), chat, thumbs, GenerationSettings(), random.Random(seed),
               session="bench", regenerate=0.25, raters=5)
    snap = snapshot(store)
    tokenizer = bot.loaded.tokenizer
    rm, metrics = train_reward_model(str(starter), tokenizer, snap.train, snap.train_pairs, snap.heldout,
                                     snap.heldout_pairs, RewardConfig(), device=torch.device("cpu"),
                                     progress=log)
    store.close()
    return rm, metrics, snap


def run_ours(starter: Path, rm, prompts, steps: int, settings):
    from chatbot.models import load_model
    from online_rl.ppo import PPOConfig, PPOTrainer, add_lora

    loaded = load_model(str(starter), starter, device="cpu")
    loaded.tokenizer.padding_side = "left"
    config = PPOConfig(steps=steps, max_kl=1e9)  # the same number of steps as the peer: no early end
    trainer = PPOTrainer(add_lora(loaded.model, config), loaded.tokenizer, config, settings,
                         progress=lambda line: None)
    started = time.perf_counter()
    trainer.train(prompts, lambda p, r: rm.score(p, r))
    return trainer.unwrapped.policy, loaded.tokenizer, time.perf_counter() - started


def run_trl(starter: Path, rm, prompts, steps: int, settings, scratch: Path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    from chatbot.models import load_tokenizer
    from online_rl.ppo import PPOConfig

    ours = PPOConfig()
    tokenizer = load_tokenizer(str(starter))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(starter), dtype=torch.float32)

    def reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rm.score(prompts, [t.strip() for t in texts])

    args = RLOOConfig(
        output_dir=str(scratch / "rloo"), per_device_train_batch_size=ours.rollouts,
        num_generations=ours.samples_per_prompt, max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, top_k=0, learning_rate=ours.lr,
        beta=ours.kl_coef, max_steps=steps, logging_steps=max(1, steps // 5), save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
        seed=0,
    )
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=ours.lora_r, lora_alpha=ours.lora_alpha,
                             lora_dropout=0.0, target_modules="all-linear")
    trainer = RLOOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer, peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    return trainer.model, tokenizer, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where the starter model is (built if missing)")
    parser.add_argument("--taste", default="long")
    parser.add_argument("--thumbs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from chatbot.models import GenerationSettings, load_model
    from chatbot.starter import ensure_starter
    from online_rl.ppo import PPOConfig
    from online_rl.simulate import corpus_prompts
    from online_rl.tastes import resolve

    starter = ensure_starter(args.data_dir)
    settings = GenerationSettings()
    ours = PPOConfig()
    taste = resolve(args.taste)
    _, heldout = corpus_prompts(args.seed, 200)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-rloo-") as scratch:
        scratch = Path(scratch)
        rm, rm_metrics, snap = reward_model(starter, args.taste, args.thumbs, args.seed, scratch / "store")
        log(f"reward model: AUC {rm_metrics['auc']} ({rm_metrics['auc_low']}-{rm_metrics['auc_high']})")
        prompts = snap.prompts
        base = load_model(str(starter), starter, device="cpu")
        base.tokenizer.padding_side = "left"
        results["base (v0)"] = (measure(base.model, base.tokenizer, heldout, taste, rm, settings), None)
        for name, run in (("ours (online_rl.ppo)", lambda: run_ours(starter, rm, prompts, args.steps, settings)),
                          ("TRL RLOOTrainer", lambda: run_trl(starter, rm, prompts, args.steps, settings,
                                                             scratch))):
            torch.manual_seed(args.seed)
            log(f"training: {name}")
            model, tokenizer, seconds = run()
            tokenizer.padding_side = "left"
            model.eval()
            results[name] = (measure(model, tokenizer, heldout, taste, rm, settings), seconds)
            log(f"{name}: {results[name]}")
    for name, (m, seconds) in results.items():
        rows.append([name, f"{m['approval']:.3f} ± {m['se']:.3f}", m["rm"], m["kl_per_token"], m["base_nll"],
                     m["known_words"], m["mean_words"], "" if seconds is None else f"{seconds:.0f} s",
                     " / ".join(m["examples"])[:160]])
    body = table(["policy", f"approval ({args.taste})", "reward-model logit", "KL to base (nats/token)",
                  "base NLL per token", "known words", "mean words", "training", "replies"], rows)
    body += (f"\n\nOne reward model (AUC {rm_metrics['auc']} on {rm_metrics['heldout_examples']} held-out thumbs) "
             f"trained on {args.thumbs} thumbs of a simulated `{args.taste}` user on v0; each policy a fresh LoRA "
             f"(r=16, all linear layers) trained {args.steps} steps of {ours.prompts_per_step} prompts x "
             f"{ours.samples_per_prompt} replies on the same {len(prompts)} prompts, lr {ours.lr:g}, KL "
             f"coefficient {ours.kl_coef:g}, sampling as the bot serves; measured on 200 "
             "held-out corpus prompts x 2 replies. TRL is given the base and a `peft_config` (its reference is "
             "then the base with the adapter disabled, as ours).")
    print(body)
    if not args.no_write:
        write_section(f"rloo-{args.taste}", f"PPO against TRL's RLOOTrainer ({args.taste}, starter model, CPU)",
                      "python benchmarks/bench_rloo.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
