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
Nor need either tell alone: the two AUCs are independent estimates, and
pooled (`pooled`, weighed by the inverse of their variances) their
interval is narrower than either's. On `long` with noisy raters one round
had the held-out side at 0.61 (0.43-0.79) and the judge at 0.57
(0.50-0.63), and waited; pooled, 0.57 (0.51-0.64).
When none of these can tell, and the policy's reward model at least leans the
right way on its held-out thumbs, every thumb is scored by a reward model trained
without it, in `RewardConfig.cv_folds` folds (`cross_validate`): an AUC over
all the thumbs rather than a fifth of them, whose interval is about half as
wide. Measured on `concise` (72 thumbs up in the first 100), the held-out
side's 18 thumbs gave AUC 0.72 with an interval of 0.46-0.98 and the judge
0.42, and the first round waited.
Otherwise `NotInformative` is raised, no policy is trained, and the cycle
waits for more feedback. Each of the four checks is a one-sided test at
2.5%; taken together, thumbs that say nothing train a policy at most 10% of
the time (less: the four are far from independent), and the gate still
judges what it makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from online_rl.data import Example, Snapshot, is_heldout, stable_unit
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


def _auc_se(metrics: dict | None) -> float | None:
    """The standard error behind an AUC's 95% interval (its unclipped side:
    the interval is cut at 0 and 1)."""
    if not metrics or metrics.get("auc") is None or metrics.get("auc_low") is None:
        return None
    return max(metrics["auc"] - metrics["auc_low"], metrics["auc_high"] - metrics["auc"]) / 1.96


def pooled(metrics: dict | None, judge_metrics: dict | None) -> dict | None:
    """The two sides' AUCs as one estimate, each weighed by the inverse of
    its variance (a fixed-effect meta-analysis), with its 95% interval. The
    two are independent: different reward models, trained and scored on
    different thumbs. Under thumbs that carry no taste both are 0.5, so the
    pooled interval tests the same thing as either with more thumbs behind
    it. None unless both have an interval."""
    parts = [(m["auc"], _auc_se(m)) for m in (metrics, judge_metrics) if _auc_se(m)]
    if len(parts) < 2:
        return None
    weights = [1 / se ** 2 for _, se in parts]
    mean = sum(w * a for w, (a, _) in zip(weights, parts)) / sum(weights)
    se = 1 / math.sqrt(sum(weights))
    return {"auc": round(mean, 4), "auc_low": round(max(0.0, mean - 1.96 * se), 4),
            "auc_high": round(min(1.0, mean + 1.96 * se), 4)}


def informative(metrics: dict, judge_metrics: dict | None, bar: float, cv: dict | None = None) -> str | None:
    """None when the thumbs say what people like (see the module's
    docstring; `cv`: the figures of `cross_validate`, when it ran); else why
    not, in words."""
    if bar < 0 or better_than_chance(metrics, bar):
        return None
    if metrics.get("auc_low") is None:
        return (f"there are no held-out thumbs of both kinds to judge the reward model on "
                f"({metrics['heldout_examples']} held out)")
    why = (f"the reward model is no better than chance on held-out thumbs (AUC {metrics['auc']}, "
           f"95% interval {metrics['auc_low']}-{metrics['auc_high']}, {metrics['heldout_examples']} held-out thumbs)")
    both = pooled(metrics, judge_metrics)
    if metrics["auc"] is not None and metrics["auc"] > bar and (better_than_chance(judge_metrics, bar)
                                                                 or better_than_chance(both, bar)
                                                                 or better_than_chance(cv, bar)):
        return None
    if judge_metrics and judge_metrics.get("auc") is not None:
        why += (f", nor is the judge on the training side's (AUC {judge_metrics['auc']}, 95% interval "
                f"{judge_metrics['auc_low']}-{judge_metrics['auc_high']})")
    if both:
        why += f", nor are both sides pooled (AUC {both['auc']}, 95% interval {both['auc_low']}-{both['auc_high']})"
    if cv and cv.get("auc") is not None:
        why += (f", nor are all {cv['examples']} thumbs in {cv['folds']} folds (AUC {cv['auc']}, 95% interval "
                f"{cv['auc_low']}-{cv['auc_high']})")
    return why


def fold_of(conversation_id: str, folds: int) -> int:
    """Which fold a conversation's thumbs fall in: a hash, stable across runs."""
    return int(stable_unit(f"cv:{conversation_id}") * folds)


def cross_validate(base_path: str, tokenizer, examples: list[Example], config, *, device,
                   progress=print) -> dict | None:
    """Every thumb scored by a fresh reward model trained on the other folds
    (`config.cv_folds`, split by conversation), each stopped on a fifth of its
    own training thumbs, never on the fold it scores; the AUC over all the
    thumbs, each fold's scores standardized first (the fold models' scales
    differ; standardizing uses no labels), with its 95% interval, weighted by
    the rater bound as the held-out figures are. None when fewer than two
    folds hold thumbs or a class is missing."""
    from online_rl.reward import auc_with_interval, train_reward_model

    folds = config.cv_folds
    labels = [e.label for e in examples]
    if folds < 2 or all(labels) or not any(labels):
        return None
    of = [fold_of(e.conversation_id, folds) for e in examples]
    if len(set(of)) < 2:
        return None
    scores = [0.0] * len(examples)
    for fold in sorted(set(of)):
        rest = [e for e, f in zip(examples, of) if f != fold]
        held = [is_heldout(f"cv-stop:{e.conversation_id}", 0.2) for e in rest]
        train = [e for e, h in zip(rest, held) if not h]
        stop = [e for e, h in zip(rest, held) if h]
        if not train:  # too few conversations to keep any out: train on them all, every epoch counts
            train, stop = rest, []
        progress(f"fold {fold + 1}/{folds}: training on {len(train)} thumbs, stopping on {len(stop)}")
        rm, _ = train_reward_model(base_path, tokenizer, train, [], stop, [], config,
                                   device=device, progress=lambda line: None, name=f"fold {fold + 1}")
        members = [i for i, f in enumerate(of) if f == fold]
        raw = rm.score([examples[i].prompt for i in members], [examples[i].reply for i in members])
        mean = sum(raw) / len(raw)
        spread = math.sqrt(sum((x - mean) ** 2 for x in raw) / len(raw)) or 1.0
        for i, x in zip(members, raw):
            scores[i] = (x - mean) / spread
        del rm
    value, low, high = auc_with_interval(scores, labels, [e.weight for e in examples])
    return {"folds": folds, "examples": len(examples), "auc": value, "auc_low": low, "auc_high": high}


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
    metrics["pooled"] = pooled(metrics, judge_metrics)
    why = informative(metrics, judge_metrics, config.reward.min_auc_low)
    held_out_leans = metrics["auc"] is not None and metrics["auc"] > config.reward.min_auc_low
    if why is not None and config.reward.cv_folds >= 2 and held_out_leans:
        examples = snap.train + snap.heldout
        job.report(f"reward model: neither side can tell yet; cross-validating all {len(examples)} thumbs in "
                   f"{config.reward.cv_folds} folds", stage="reward_model")
        cv = cross_validate(rm_base, rm_tokenizer, examples, config.reward, device=device,
                            progress=lambda line: job.report(f"cross-validation: {line}"))
        metrics["cross_validation"] = cv
        if cv is not None:
            job.report(f"cross-validation: AUC {cv['auc']} (95% interval {cv['auc_low']}-{cv['auc_high']}) "
                       f"on {cv['examples']} thumbs")
        why = informative(metrics, judge_metrics, config.reward.min_auc_low, cv)
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
