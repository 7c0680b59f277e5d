"""Phase 2 of a retrain cycle: the two reward models.

- the **policy's reward model**, trained on the training side and stopped on
  the held-out side's loss: what PPO optimizes;
- the **judge**, trained on the held-out side and stopped on the training
  side's loss: the policy update never sees it, so the gate can judge the candidate with
  evidence the policy did not optimize.

Each warm-starts from its previous run's model. The two are two folds of
one cross-validation, and together they decide whether the thumbs say yet
what people like (`informative`): the policy's reward model must rank its
held-out thumbs better than chance, and one of the two must do so with
confidence (its AUC's 95% interval above 0.5, `RewardConfig.min_auc_low`).
The held-out side is a fifth of the thumbs, so early on (20 thumbs, or few
effective ones once the rater bound shrinks a loud rater's) its interval
spans 0.5 whatever the reward model learned, and every cycle waited; the
judge is scored on the other four fifths. When the judge, trained on a
quarter as many thumbs, already ranks the training side's thumbs better
than chance, the thumbs carry a taste a reward model can learn from.
Otherwise `NotInformative` is raised, no policy is trained, and the cycle
waits for more feedback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from online_rl.data import Snapshot
from online_rl.distributed import broadcast

REWARD_DIR = "reward_models"


class NotInformative(Exception):
    """The thumbs do not yet say what people like; `metrics` says how far they go."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


def latest_reward_model(store, key: str = "reward_model_path") -> str | None:
    """The newest reward model (or judge, with key ``judge_model_path``) a
    succeeded run left on disk."""
    for run in store.runs(limit=200):
        path = (run.get("metrics") or {}).get(key)
        if run["status"] == "succeeded" and path and Path(path).exists():
            return path
    return None


def better_than_chance(metrics: dict | None, bar: float = 0.5) -> bool:
    """The lower end of the reward model's AUC interval lies above `bar`."""
    low = (metrics or {}).get("auc_low")
    return low is not None and low > bar


def informative(metrics: dict, judge_metrics: dict | None, bar: float) -> str | None:
    """None when the thumbs say what people like (see the module's
    docstring); else why not, in words."""
    if bar < 0 or better_than_chance(metrics, bar):
        return None
    if metrics.get("auc_low") is None:
        return (f"there are no held-out thumbs of both kinds to judge the reward model on "
                f"({metrics['heldout_examples']} held out)")
    why = (f"the reward model is no better than chance on held-out thumbs (AUC {metrics['auc']}, "
           f"95% interval {metrics['auc_low']}-{metrics['auc_high']}, {metrics['heldout_examples']} held-out thumbs)")
    if metrics["auc"] is not None and metrics["auc"] > bar and better_than_chance(judge_metrics, bar):
        return None
    if judge_metrics and judge_metrics.get("auc") is not None:
        why += (f", nor is the judge on the training side's (AUC {judge_metrics['auc']}, 95% interval "
                f"{judge_metrics['auc_low']}-{judge_metrics['auc_high']})")
    return why


@dataclass
class Rewards:
    policy: object  # RewardModel PPO optimizes
    judge: object | None  # RewardModel the policy update never sees (main process only)
    metrics: dict | None
    judge_metrics: dict | None
    path: Path | None
    judge_path: Path | None

    @property
    def judge_informative(self) -> bool:
        return better_than_chance(self.judge_metrics)


def train_reward_models(job, snap: Snapshot, base_path: str, tokenizer, device) -> Rewards:
    """The policy's reward model (trained on the training side, stopped on the
    held-out side) and the judge (the other way round); the other processes
    load the policy's reward model the main process saved."""
    from chatbot.models import load_tokenizer, resolve_model_path
    from online_rl.reward import load_reward_model, train_reward_model

    config = job.config
    rm_base = resolve_model_path(config.reward_model, job.data_dir) if config.reward_model else base_path
    rm_tokenizer = tokenizer if rm_base == base_path else load_tokenizer(rm_base)
    if not job.main:
        path = broadcast(None)
        if path is None:
            raise NotInformative("waiting for more feedback")
        return Rewards(load_reward_model(rm_base, path, rm_tokenizer, device), None, None, None, Path(path), None)

    directory = job.data_dir / REWARD_DIR
    directory.mkdir(parents=True, exist_ok=True)
    job.report("reward model: training on the training side", stage="reward_model")
    rm, metrics = train_reward_model(rm_base, rm_tokenizer, snap.train, snap.train_pairs, snap.heldout,
                                     snap.heldout_pairs, config.reward, device=device,
                                     previous=latest_reward_model(job.store), progress=lambda line: job.report(line))
    job.report(f"reward model: held-out AUC {metrics['auc']} (95% interval {metrics['auc_low']}-"
               f"{metrics['auc_high']}) on {metrics['heldout_examples']} thumbs, Brier {metrics['brier']}, "
               f"pair accuracy {metrics['pair_accuracy']}")
    judge, judge_metrics = None, None
    if snap.heldout or snap.heldout_pairs:  # (no held-out thumbs: nothing to train the judge on)
        job.report("judge: training a reward model on the held-out side", stage="reward_model")
        judge, judge_metrics = train_reward_model(rm_base, rm_tokenizer, snap.heldout, snap.heldout_pairs, snap.train,
                                                  snap.train_pairs, config.reward, device=device,
                                                  previous=latest_reward_model(job.store, "judge_model_path"),
                                                  progress=lambda line: job.report(line.replace("reward model",
                                                                                                "judge")),
                                                  name="judge")
        job.report(f"judge: AUC {judge_metrics['auc']} (95% interval {judge_metrics['auc_low']}-"
                   f"{judge_metrics['auc_high']}) on the {judge_metrics['heldout_examples']} training-side thumbs")
    why = informative(metrics, judge_metrics, config.reward.min_auc_low)
    if why is not None:
        if job.dist is not None:
            broadcast(None)
        raise NotInformative(f"waiting for more feedback: {why}; no policy is trained on it",
                             {"reward_model": metrics, "judge_model": judge_metrics, "feedback": snap.counts(),
                              "rater_shares": snap.rater_shares()})
    path = directory / f"run-{job.run_id}"
    rm.save(path, metrics)
    if job.dist is not None:
        broadcast(str(path))
    judge_path = None
    if judge is not None:
        judge_path = directory / f"run-{job.run_id}-judge"
        judge.save(judge_path, judge_metrics)
    return Rewards(rm, judge, metrics, judge_metrics, path, judge_path)


def scorer(rm):
    """A reward function: the reward model's logits, as they are."""
    return lambda prompts, replies: rm.score(prompts, replies)
