"""The reward model: how much would a person like this reply?

The base model (or a smaller one named by ``--reward-model``) with a scalar
head (`AutoModelForSequenceClassification`, one label) and a LoRA adapter.
It reads the conversation and the reply, closed by the end-of-sequence token,
and scores the last token.

Loss: binary cross-entropy on the thumbs (each class weighted so that
unbalanced up/down counts pull equally) plus a Bradley-Terry term on pairs,
``-log sigmoid(r_chosen - r_rejected)``. Every thumb and pair counts with its
weight from the rater bound (`Example.weight`, `Pair.weight`: no rater
holds more than their bounded share of either term). Training stops on the loss on
held-out thumbs and keeps its best epoch. Held-out AUC with its 95%
interval, accuracy, calibration (Brier score, expected calibration error)
and pair accuracy are reported. When a previous reward model exists its
adapter and head are the starting point: every run replays all feedback, so
continuing is only a warm start, not a different objective.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from online_rl.data import Example, Pair, encode

ProgressFn = Callable[[str], None]


@dataclass
class RewardConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 2e-3
    epochs: int = 10  # at most; training stops when the validation loss stops improving
    patience: int = 2  # epochs without a better validation loss before stopping
    batch_size: int = 16
    pair_weight: float = 1.0  # weight of the Bradley-Terry term beside the BCE term
    max_length: int = 256
    # A reward model trains a policy only when the lower end of its held-out
    # AUC's 95% interval is above this (with no held-out thumbs of both kinds
    # there is no interval, and it waits too): at 0.5, one no better than
    # chance never steers the bot. Below 0: no such requirement.
    min_auc_low: float = 0.5
    # When neither side's figures can tell (the held-out side is a fifth of
    # the thumbs: early on its interval spans 0.5 whatever was learned), the
    # thumbs are cross-validated in this many folds, every thumb scored by a
    # reward model that never saw it (`online_rl.reward_models.cross_validate`).
    # 0: no cross-validation.
    cv_folds: int = 5
    seed: int = 0


class RewardModel:
    """A trained scorer: `score(prompts, replies)` gives one float per reply."""

    def __init__(self, model, tokenizer, device, max_length: int = 256):
        self.model, self.tokenizer, self.device, self.max_length = model, tokenizer, device, max_length

    def _batch(self, prompts: list[list[dict]], replies: list[str]):
        from online_rl.sampling import left_pad

        rows = []
        for prompt, reply in zip(prompts, replies):
            p, r = encode(self.tokenizer, prompt, reply, max_length=self.max_length)
            rows.append(p + r)
        # Left padding: the scored last token is at the end of every row.
        return left_pad(rows, self.tokenizer.pad_token_id, self.device)

    def forward(self, prompts, replies):
        """Scores with gradients (training)."""
        ids, mask = self._batch(prompts, replies)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return logits.reshape(-1).float()

    def score(self, prompts: list[list[dict]], replies: list[str], batch_size: int = 64) -> list[float]:
        import torch

        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(replies), batch_size):
                out.extend(self.forward(prompts[i:i + batch_size], replies[i:i + batch_size]).tolist())
        self.model.train(was_training)
        return out

    def save(self, path: str | Path, metrics: dict | None = None) -> None:
        path = Path(path)
        self.model.save_pretrained(str(path))
        (path / "reward.json").write_text(json.dumps({"max_length": self.max_length, "metrics": metrics or {}},
                                                     indent=2))


def load_reward_base(base_path: str, tokenizer, device, dtype=None):
    """The base with a fresh one-label score head, set up to find its last token."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(0)  # the head's initial weights
    # The score head is new by design; transformers' report of it as missing is noise here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1,
                                                                   dtype=dtype or torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def load_reward_model(base_path: str, adapter_path: str | Path, tokenizer, device, *, trainable=False) -> RewardModel:
    from peft import PeftModel

    base = load_reward_base(base_path, tokenizer, device)
    model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=trainable).to(device)
    info = Path(adapter_path) / "reward.json"
    max_length = json.loads(info.read_text()).get("max_length", 256) if info.exists() else 256
    return RewardModel(model, tokenizer, device, max_length)


def new_reward_model(base_path: str, tokenizer, device, config: RewardConfig) -> RewardModel:
    from peft import LoraConfig, TaskType, get_peft_model

    base = load_reward_base(base_path, tokenizer, device)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=0.0, target_modules="all-linear")
    return RewardModel(get_peft_model(base, lora), tokenizer, device, config.max_length)


def train_reward_model(
    base_path: str,
    tokenizer,
    train: list[Example],
    train_pairs: list[Pair],
    valid: list[Example],
    valid_pairs: list[Pair],
    config: RewardConfig,
    *,
    device,
    previous: str | Path | None = None,
    progress: ProgressFn = print,
    name: str = "reward model",
) -> tuple[RewardModel, dict]:
    """Fit a reward model on `train` (and its pairs); stop on the loss on
    `valid` and report AUC (with its 95% interval) and calibration there.

    After every epoch the validation loss is measured; training stops when it
    has not improved for `patience` epochs, and the weights of the best epoch
    are kept (the starting point counts as epoch 0: a warm start that more
    training only makes worse is kept as it is)."""
    import torch

    if not train and not train_pairs:
        raise ValueError(f"no thumbs to train the {name} on")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if previous and Path(previous).exists():
        rm = load_reward_model(base_path, previous, tokenizer, device, trainable=True)
        rm.max_length = config.max_length
    else:
        previous = None
        rm = new_reward_model(base_path, tokenizer, device, config)
    model = rm.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    w_up, w_down = class_weights(train)
    batches_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    rng = random.Random(config.seed)
    pairs = list(train_pairs)
    started = time.perf_counter()

    def snapshot_weights():
        return [p.detach().clone() for p in params]

    best_loss = validation_loss(rm, valid, valid_pairs, config)
    best, best_epoch, stale, step, losses = snapshot_weights(), 0, 0, 0, []
    epochs_run = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = list(train)
        rng.shuffle(order)
        rng.shuffle(pairs)
        for b in range(batches_per_epoch):
            batch = order[b * config.batch_size:(b + 1) * config.batch_size]
            loss = torch.zeros((), device=device)
            if batch:
                scores = rm.forward([e.prompt for e in batch], [e.reply for e in batch])
                labels = torch.tensor([float(e.label) for e in batch], device=device)
                weights = torch.tensor([(w_up if e.label else w_down) * e.weight for e in batch], device=device)
                loss = loss + (torch.nn.functional.binary_cross_entropy_with_logits(
                    scores, labels, reduction="none") * weights).mean()
            if pairs and config.pair_weight > 0:
                chunk = [pairs[(b * config.batch_size + i) % len(pairs)]
                         for i in range(min(len(pairs), config.batch_size))]
                both = rm.forward([p.prompt for p in chunk] * 2,
                                  [p.chosen for p in chunk] + [p.rejected for p in chunk])
                margin = both[: len(chunk)] - both[len(chunk):]
                pair_weights = torch.tensor([p.weight for p in chunk], device=device)
                loss = loss - config.pair_weight * (torch.nn.functional.logsigmoid(margin) * pair_weights).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        epochs_run = epoch
        current = validation_loss(rm, valid, valid_pairs, config)
        progress(f"{name}: epoch {epoch}/{config.epochs}, train loss {sum(losses[-batches_per_epoch:]) / batches_per_epoch:.3f}"
                 + (f", validation loss {current:.3f}" if current is not None else ""))
        if current is None:  # nothing to validate on: every epoch counts
            best, best_epoch = snapshot_weights(), epoch
        elif current < best_loss - 1e-4:
            best_loss, best, best_epoch, stale = current, snapshot_weights(), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    with torch.no_grad():
        for p, saved in zip(params, best):
            p.copy_(saved)
    model.eval()
    metrics = {
        "steps": step,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "train_examples": len(train),
        "train_pairs": len(train_pairs),
        "validation_loss": None if best_loss is None else round(best_loss, 4),
        "continued_from": str(previous) if previous else None,
        "seconds": round(time.perf_counter() - started, 1),
        **evaluate_reward_model(rm, valid, valid_pairs),
    }
    return rm, metrics


def class_weights(examples: list[Example]) -> tuple[float, float]:
    """(up, down) weights so that each class carries half the loss however
    unbalanced the counts (counted with the examples' weights)."""
    total = sum(e.weight for e in examples)
    up = sum(e.weight for e in examples if e.label)
    down = total - up
    return (total / (2 * up) if up > 0 else 0.0, total / (2 * down) if down > 0 else 0.0)


def validation_loss(rm: RewardModel, examples: list[Example], pairs: list[Pair], config: RewardConfig):
    """The training objective on held-out data (BCE weighted by class and by
    the rater bound, plus the pair term); None when there is nothing to
    measure it on."""
    if not examples and not pairs:
        return None
    total = 0.0
    if examples:
        w_up, w_down = class_weights(examples)
        scores = rm.score([e.prompt for e in examples], [e.reply for e in examples])
        total += sum((w_up if e.label else w_down) * e.weight * _bce(s, e.label)
                     for s, e in zip(scores, examples)) / len(examples)
    if pairs and config.pair_weight > 0:
        chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
        total += config.pair_weight * sum(p.weight * _bce(c - r, True)
                                          for p, c, r in zip(pairs, chosen, rejected)) / len(pairs)
    return total


def _bce(logit: float, label: bool) -> float:
    """-log sigmoid(±logit), computed stably."""
    z = logit if label else -logit
    return max(-z, 0.0) + math.log1p(math.exp(-abs(z)))


def evaluate_reward_model(rm: RewardModel, examples: list[Example], pairs: list[Pair]) -> dict:
    """On held-out thumbs: AUC (a liked reply ranked above a disliked one)
    with its 95% interval, both under the rater bound's weights (so that one
    loud rater's thumbs count no more here than in training: unweighted, a
    rater who contradicts everyone else held the AUC at chance, and every
    cycle waited), accuracy at score 0, calibration of
    sigmoid(score) as a chance of a thumbs-up (Brier score and expected
    calibration error), and the share of pairs ranked the right way. None
    where there is no data."""
    out = {"heldout_examples": len(examples), "heldout_pairs": len(pairs), "auc": None, "auc_low": None,
           "auc_high": None, "accuracy": None, "brier": None, "ece": None, "pair_accuracy": None}
    if examples:
        scores = rm.score([e.prompt for e in examples], [e.reply for e in examples])
        labels = [e.label for e in examples]
        weights = [e.weight for e in examples]
        out["auc"], out["auc_low"], out["auc_high"] = auc_with_interval(scores, labels, weights)
        out["accuracy"] = round(sum((s > 0) == y for s, y in zip(scores, labels)) / len(labels), 4)
        out.update(calibration(scores, labels))
    if pairs:
        chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
        out["pair_accuracy"] = round(sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), 4)
    return out


def auc_with_interval(scores: list[float], labels: list[bool], weights: list[float]):
    """(AUC, low, high): `auc` under `weights` and its 95% `auc_interval`
    from the effective class sizes; None where a class is missing."""
    value = auc(scores, labels, weights)
    interval = auc_interval(value, effective_count([w for w, y in zip(weights, labels) if y]),
                            effective_count([w for w, y in zip(weights, labels) if not y]))
    return (value, *(interval or (None, None)))


def auc_interval(value: float | None, n_pos: float, n_neg: float, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of an AUC from Hanley & McNeil (1982): its standard error
    from the AUC and the two class sizes (effective sizes, for weighted
    rows). None when a class is missing."""
    if value is None or not n_pos or not n_neg:
        return None
    a = min(max(value, 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return round(max(0.0, value - z * se), 4), round(min(1.0, value + z * se), 4)


def calibration(scores: list[float], labels: list[bool], bins: int = 10) -> dict:
    """Brier score and expected calibration error of sigmoid(score)."""
    probs = [1 / (1 + math.exp(-max(-50.0, min(50.0, s)))) for s in scores]
    brier = sum((p - y) ** 2 for p, y in zip(probs, labels)) / len(probs)
    ece = 0.0
    for b in range(bins):
        members = [(p, y) for p, y in zip(probs, labels) if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1)]
        if members:
            confidence = sum(p for p, _ in members) / len(members)
            observed = sum(y for _, y in members) / len(members)
            ece += len(members) / len(probs) * abs(confidence - observed)
    return {"brier": round(brier, 4), "ece": round(ece, 4)}


def auc(scores: list[float], labels: list[bool], weights: list[float] | None = None) -> float | None:
    """Area under the ROC curve: the chance a random liked reply outscores a
    random disliked one (ties count half), each reply drawn by its weight
    (default 1). None when a class is missing."""
    weights = [1.0] * len(scores) if weights is None else weights
    pos = sum(w for w, y in zip(weights, labels) if y)
    neg = sum(w for w, y in zip(weights, labels) if not y)
    if pos <= 0 or neg <= 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    wins, below, i = 0.0, 0.0, 0  # below: disliked weight under the current score
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        tied = order[i:j + 1]
        tied_neg = sum(weights[k] for k in tied if not labels[k])
        wins += sum(weights[k] for k in tied if labels[k]) * (below + tied_neg / 2)
        below += tied_neg
        i = j + 1
    return round(wins / (pos * neg), 4)


def effective_count(weights: list[float]) -> float:
    """Kish's effective sample size of weighted rows: (sum w)^2 / sum w^2."""
    square = sum(w * w for w in weights)
    return sum(weights) ** 2 / square if square > 0 else 0.0
