"""KTO: learn straight from the unpaired thumbs, with TRL's `KTOTrainer`.

Thumbs are exactly KTO's input: (prompt, completion, desirable or not), no
pairs and no reward model needed. The policy is a LoRA adapter on the base;
the reference is the same base with the adapter disabled (TRL does this for
a `PeftModel` when no reference model is given).

The KTO paper recommends weighting so that
``desirable_weight * n_up / (undesirable_weight * n_down)`` lies in [1, 4/3];
the weights here make that ratio exactly 1 whatever the counts.

`KTOTrainer` takes no per-row weights (and its KL estimate needs the rows in
order), so the rater bound reaches KTO as a draw: it trains on as many rows
as there are thumbs, drawn in proportion to their weights
(`online_rl.influence.weighted_draw`). A down-weighted rater's thumbs are
drawn less often, some of them not at all in a given run.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from online_rl.data import Example
from online_rl.influence import weighted_draw
from storage import shapes

ProgressFn = Callable[[str], None]


@dataclass
class KTOSettings:
    epochs: int = 3
    batch_size: int = 16  # KTO needs more than 1: its KL estimate pairs each prompt with another reply
    lr: float = 5e-4
    beta: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 256
    max_steps: int = 0  # 0: as many as the epochs need
    seed: int = 0


def class_weights(n_up: int, n_down: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) that balance the two classes:
    the rarer class is weighted up, the other keeps weight 1."""
    if not n_up or not n_down:
        return 1.0, 1.0
    if n_up >= n_down:
        return 1.0, n_up / n_down
    return n_down / n_up, 1.0


def bounded_rows(examples: list[Example], seed: int = 0) -> list[Example]:
    """The thumbs KTO trains on: as they are when every weight is the same,
    else as many drawn in proportion to their rater-bound weights."""
    weights = [e.weight for e in examples]
    if not examples or max(weights) - min(weights) <= 1e-9 * max(weights):
        return list(examples)
    return weighted_draw(examples, weights, len(examples), random.Random(seed))


def to_rows(examples: list[Example]) -> list[dict]:
    """TRL's conversational unpaired format (`storage.shapes`)."""
    return [shapes.unpaired_row(e.prompt, e.reply, e.label) for e in examples]


def train_kto(model, tokenizer, examples: list[Example], settings: KTOSettings, *,
              progress: ProgressFn = print, device: str = "auto") -> tuple[object, dict]:
    """Train a LoRA adapter with KTO; return the `PeftModel` and metrics.

    `model` is the base; a fresh adapter is added to it.
    """
    import datasets
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import PrinterCallback, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    if len(examples) < 2:
        raise ValueError(f"KTO needs at least 2 rated replies, got {len(examples)}")
    drawn = bounded_rows(examples, settings.seed)
    distinct = len({id(e) for e in drawn})
    examples = drawn
    n_up = sum(e.label for e in examples)
    desirable, undesirable = class_weights(n_up, len(examples) - n_up)
    batch_size = max(2, min(settings.batch_size, len(examples)))
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total = min(total, settings.max_steps)

    class Progress(TrainerCallback):
        def __init__(self):
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append({"step": state.global_step, **logs})
                loss = logs.get("loss")
                if loss is not None:
                    progress(f"kto: step {state.global_step}/{state.max_steps} loss {loss:.4f}"
                             + (f" kl {logs['kl']:.3f}" if "kl" in logs else ""))

    datasets.disable_progress_bars()  # progress is reported per training step instead
    callback = Progress()
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                             lora_dropout=0.0, target_modules="all-linear")
    import torch

    on_gpu = device != "cpu" and torch.cuda.is_available()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kto-") as scratch:
        args = KTOConfig(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            num_train_epochs=settings.epochs,
            max_steps=total,
            learning_rate=settings.lr,
            beta=settings.beta,
            desirable_weight=desirable,
            undesirable_weight=undesirable,
            max_length=settings.max_length,
            logging_steps=max(1, min(10, total // 5)),
            save_strategy="no",
            report_to="none",
            seed=settings.seed,
            use_cpu=not on_gpu,
            # TRL defaults to bf16 autocast and gradient checkpointing; on a CPU
            # both make a small model several times slower, and checkpointing
            # only pays when activations do not fit.
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
            disable_tqdm=True,
            lr_scheduler_type="constant",
        )
        trainer = KTOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(to_rows(examples)),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)  # progress goes through `progress` instead
        result = trainer.train()
    trained = trainer.model
    trained.eval()
    last = [log for log in callback.logs if "loss" in log]
    metrics = {
        "steps": result.global_step,
        "examples": len(examples),
        "distinct_examples": distinct,  # fewer when the rater bound drew some thumbs more often than others
        "up": n_up,
        "down": len(examples) - n_up,
        "desirable_weight": round(desirable, 4),
        "undesirable_weight": round(undesirable, 4),
        "batch_size": batch_size,
        "train_loss": round(float(result.training_loss), 5),
        "last_log": last[-1] if last else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return trained, metrics
