"""Phase 3 of a retrain cycle: the policy update.

From the active version's adapter (or a fresh LoRA on the base when v0 is
active), sampling as the bot serves: the tilt (the default, its own replies
re-weighted by the policy's reward model, `online_rl.tilt`) or PPO against
that reward model's logits (`online_rl.ppo`, with the KL coefficient the
active adapter's cycle ended with); or KTO straight from the thumbs on a
fresh adapter (`online_rl.kto`). Prompts, liked replies and corrections are
drawn in proportion to their rater-bound weights (`online_rl.influence`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from online_rl.data import Snapshot
from online_rl.reward_models import Rewards, scorer

if TYPE_CHECKING:
    from online_rl.cycle import Job


def carried_kl_coef(active_path: str | None) -> float | None:
    """The KL coefficient the active adapter's cycle ended with."""
    if not active_path:
        return None
    try:
        about = json.loads((Path(active_path) / "adapter.json").read_text())
    except (OSError, ValueError):
        return None
    value = ((about.get("metrics") or {}).get("kl_coef"))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def update_policy(job: Job, snap: Snapshot, tokenizer, device, rewards: Rewards, active_path: str | None):
    """(policy, parent version, training metrics); policy None on the other processes."""
    from chatbot.models import load_model

    config = job.config
    job.report(f"loading base model {job.model_name!r}", stage="load")
    loaded = load_model(job.model_name, job.data_dir, device=config.device, quantize=config.quantize)
    if config.method == "kto":
        from online_rl.kto import train_kto

        # KTO is an offline method over all the replayed thumbs: starting it
        # again from an adapter already trained on the same thumbs compounds
        # its epochs, so each KTO cycle trains a fresh adapter on the base.
        job.report(f"kto: {len(snap.train)} rated replies, from v0", stage="policy")
        policy, metrics = train_kto(loaded.model, tokenizer, snap.train, config.kto,
                                    progress=lambda line: job.report(line), device=str(device.type))
        policy.eval()
        return policy, "v0", metrics
    if config.method == "tilt":
        return tilt_policy(job, snap, loaded.model, tokenizer, rewards, active_path)

    from online_rl.distributed import gather_sharded_adapter, reload_with_adapter
    from online_rl.ppo import PPOTrainer

    # PPO continues from the active adapter, so what earlier cycles learned
    # accumulates, with the KL coefficient it ended with; the KL is always to
    # the base.
    ppo = dataclasses.replace(config.ppo, kl_coef=carried_kl_coef(active_path) or config.ppo.kl_coef)
    policy, parent = continue_from(job, loaded.model, active_path, ppo)
    # Prompts and liked replies are drawn in proportion to their rater-bound weights.
    prompts, prompt_weights = prompt_pool(snap)
    anchor, anchor_weights = snap.liked()
    corrections, correction_weights = snap.corrections()
    job.report(f"ppo: {ppo.steps} steps of {ppo.prompts_per_step} prompts x {ppo.samples_per_prompt} replies on "
               f"{len(prompts)} prompts, {len(anchor)} liked replies as the language anchor, {len(corrections)} "
               f"corrections as targets, from {parent}, KL coefficient {ppo.kl_coef:.3f}", stage="policy")

    def on_step(record):
        job.report(f"ppo: step {record['step']}/{ppo.steps} done", step=record["step"], of=ppo.steps, last=record)

    trainer = PPOTrainer(policy, tokenizer, ppo, config.rollout_settings(), progress=job.progress, on_step=on_step)
    history = trainer.train(prompts, scorer(rewards.policy), anchor, prompt_weights=prompt_weights,
                            anchor_weights=anchor_weights, corrections=corrections,
                            correction_weights=correction_weights)
    metrics = {"steps": len(history), "first": history[0], "last": history[-1], "history": history,
               "sharded": trainer.sharded, "stopped": trainer.stopped, "kl_coef": round(trainer.kl.value, 5),
               "score_first": history[0]["score"], "score_last": history[-1]["score"]}
    if not trainer.sharded:
        policy = trainer.unwrapped.policy
    else:
        job.report("ppo: gathering the adapter from its shards")
        gathered = gather_sharded_adapter(trainer, job.main)
        del trainer, policy  # the sharded model goes before a whole copy is loaded
        loaded.model = None
        if not job.main:
            return None, parent, metrics
        job.report("evaluation: loading the base whole, with the adapter")
        with gathered:
            policy = reload_with_adapter(gathered.name, job.model_name, job.data_dir, config.device, config.quantize)
    policy.eval()
    if not job.main:
        return None, parent, metrics
    return policy, parent, metrics


def continue_from(job: Job, model, active_path: str | None, lora_config):
    """(trainable policy, parent version): the active version's adapter, or
    a fresh LoRA of `lora_config`'s rank on the base when v0 is active."""
    from peft import PeftModel

    from online_rl.ppo import add_lora

    if active_path:
        return PeftModel.from_pretrained(model, active_path, is_trainable=True), job.active
    return add_lora(model, lora_config), "v0"


def prompt_pool(snap: Snapshot) -> tuple[list, list[float]]:
    """The prompts a policy update samples from, with their rater-bound
    weights: the training side's pool, else the rated prompts."""
    if snap.prompts:
        return snap.prompts, snap.prompt_weights
    return [e.prompt for e in snap.train], [e.weight for e in snap.train]


def tilt_policy(job: Job, snap: Snapshot, model, tokenizer, rewards: Rewards, active_path: str | None):
    """The active adapter (or a fresh one) trained towards its own replies
    re-weighted by the policy's reward model (`online_rl.tilt`)."""
    from online_rl.cycle import judged_prompts
    from online_rl.epoch_bounds import within_gate
    from online_rl.tilt import grow_tilt

    config = job.config
    tilt = within_gate(config.tilt, config.gate)
    prompts, weights = prompt_pool(snap)
    policy, parent = continue_from(job, model, active_path, tilt)
    job.report(f"tilt: {tilt.prompts} prompts drawn from {len(prompts)} x {tilt.samples_per_prompt} "
               f"replies, from {parent}", stage="policy")
    corrections, correction_weights = snap.corrections()
    # The epoch stop judges on the gate's own prompts. Judging on a split of
    # its own, it handed the gate candidates the gate turned away for their
    # language on its prompts (`long`: +0.055 and +0.052 excess NLL against
    # bounds of +0.037 and +0.039) instead of trying again with the language
    # weighed more; on the same prompts the two read the same figures
    # (+0.026 and +0.035 at the stop, +0.028 and +0.034 at the gate).
    validation = judged_prompts(snap, config)
    metrics = grow_tilt(policy, tokenizer, prompts, scorer(rewards.policy), config.rollout_settings(),
                        tilt, prompt_weights=weights, corrections=corrections,
                        correction_weights=correction_weights, validation=validation,
                        progress=lambda line: job.report(line))
    policy.eval()
    return policy, parent, metrics
