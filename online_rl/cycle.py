"""One retrain cycle: feedback in, a candidate adapter out.

1. **Snapshot** the store up to a watermark (the newest feedback id now), split
   by conversation, capped per rater. Too little feedback: the run is recorded
   as refused and `NotEnoughFeedback` is raised (the CLI exits 2).
2. **Reward model** (PPO only): trained on the snapshot, continuing from the
   previous run's reward model when there is one. A KTO run reuses the newest
   reward model to judge its candidate, training one only if none exists yet.
3. **Policy update**: PPO against the reward model, or KTO straight from the
   thumbs. Both replay all feedback; PPO continues from the active version's
   adapter, KTO trains a fresh one on the base.
4. **Evaluation** of the candidate against the active version on held-out
   prompts: reward-model win rate, KL to the base, signs of degenerate replies.
5. **Registration**: the adapter is written to a scratch directory, described
   by ``adapter.json`` (base model, method, watermark, config, metrics), and
   renamed to ``adapters/vN`` with a never-reused version; the `adapters` row
   gets status candidate.
6. **Gate** (when `promote` is set, as the scheduler and ``app.py retrain`` do):
   the candidate becomes active if it passes `online_rl.gate`, else it is
   rejected with the reasons. A running server notices the new active version
   in the database and hot-swaps it in.

Every run is a row in `runs`: running while it works (with live progress),
then succeeded, refused or failed with the error. Nothing fails silently.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from online_rl.data import DataConfig, snapshot
from online_rl.evaluate import EvalConfig, compare
from online_rl.gate import GateConfig
from online_rl.kto import KTOSettings
from online_rl.ppo import PPOConfig
from online_rl.reward import RewardConfig
from storage import Store

ProgressFn = Callable[[str], None]
METHODS = ("ppo", "kto")
ADAPTERS_DIR = "adapters"
REWARD_DIR = "reward_models"


class NotEnoughFeedback(Exception):
    """Too little feedback for a run; the message says how much there is and how much is needed."""


class CycleFailed(Exception):
    """A run failed; it is recorded in `runs` with this error."""


@dataclass
class CycleConfig:
    method: str = "ppo"
    min_feedback: int = 20  # rated replies needed (after the per-rater cap)
    device: str = "auto"
    quantize: str = "none"  # none, 8bit or 4bit: the base loaded through bitsandbytes (a GPU)
    reward_model: str | None = None  # base of the reward model; None: the policy's base
    threads: int = 0  # torch threads for training; 0 leaves torch's default
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kto: KTOSettings = field(default_factory=KTOSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promote: bool = False  # apply the gate: promote the candidate if it passes, else reject it

    def validate(self) -> CycleConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.min_feedback < 2:
            raise ValueError("min_feedback must be at least 2")
        if self.ppo.steps < 1 or self.ppo.rollouts < 1 or self.ppo.minibatch < 1:
            raise ValueError("PPO steps, rollouts and minibatch must be at least 1")
        return self


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def dir_size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


def summary_line(result: dict) -> dict:
    """The run's summary without the per-step history and the sample replies."""
    evaluation = {k: v for k, v in (result.get("evaluation") or {}).items() if k != "examples"}
    train = {k: v for k, v in (result.get("train") or {}).items() if k not in ("history", "first", "last")}
    return {**{k: v for k, v in result.items() if k not in ("train", "evaluation")},
            "train": train, "evaluation": evaluation}


def latest_reward_model(store: Store) -> str | None:
    """The newest reward model a succeeded run left on disk."""
    for run in store.runs(limit=200):
        path = (run.get("metrics") or {}).get("reward_model_path")
        if run["status"] == "succeeded" and path and Path(path).exists():
            return path
    return None


def process_group(device: str = "auto"):
    """The `accelerate` state when launched as several processes
    (``accelerate launch``), else None.

    On the CPU the processes join a gloo group: accelerate does that only when
    told the run is on the CPU (its ``--cpu`` flag starts a single process,
    so CPU processes are started by the torchrun launcher, ``--multi_gpu``)."""
    import torch
    from accelerate import PartialState

    # The other processes wait in a collective while the main process trains
    # the reward model alone (many minutes for a large base): NCCL's default
    # 10-minute timeout would end them, so allow a whole retrain.
    state = PartialState(cpu=device.startswith("cpu") or not torch.cuda.is_available(),
                         timeout=datetime.timedelta(hours=6))
    return state if state.num_processes > 1 else None


def _broadcast(dist, value):
    """`value` from the main process, on every process."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def run_cycle(store: Store, *, data_dir: str | Path, model_name: str = "starter",
              config: CycleConfig | None = None, progress: ProgressFn = print) -> dict:
    """Run one cycle and return its summary (also stored as the run's metrics).

    Under ``accelerate launch`` with several processes, the main process does
    everything that touches the database and the disk (the run row, the
    reward model, evaluation, registration, the gate); every process loads
    its own copy of the base and takes part in PPO (DDP), each sampling its
    share of the rollouts. The other processes return ``{"status": "worker"}``.
    """
    config = (config or CycleConfig()).validate()
    data_dir = Path(data_dir)
    dist = process_group(config.device)
    if dist is not None:
        if config.method != "ppo":
            raise ValueError("several training processes run PPO only; run KTO in one process")
        config.device = str(dist.device)  # each process on its own device (its GPU, or the CPU)
        if not dist.is_main_process:
            return _worker(store, data_dir, model_name, config, dist)
    try:
        watermark = store.latest_feedback_id()
        # Raises RunInProgress (nothing recorded) while another run is going.
        run_id = store.start_run(config.method, config=dataclasses.asdict(config), watermark=watermark,
                                 exclusive=True)
    except BaseException:
        if dist is not None:
            _broadcast(dist, None)  # tell the other processes there is no run
        raise
    started = time.perf_counter()
    stage = {"stage": "snapshot"}

    def report(line: str, **fields) -> None:
        stage.update(fields)
        stage["message"] = line
        stage["elapsed_s"] = round(time.perf_counter() - started, 1)
        progress(line)
        store.update_run_progress(run_id, stage)

    try:
        snap = snapshot(store, config.data, watermark)
        counts = snap.counts()
        report(f"snapshot: {counts['examples']} rated replies ({counts['up']} up, {counts['down']} down), "
               f"{counts['train_pairs'] + counts['heldout_pairs']} pairs, {counts['prompts']} prompts, "
               f"watermark {watermark}")
        if counts["examples"] < config.min_feedback or not snap.train:
            message = (f"not enough feedback to retrain: {counts['examples']} rated replies, at least "
                       f"{config.min_feedback} needed (--min-feedback)")
            store.finish_run(run_id, "refused", error=message, metrics={"feedback": counts})
            if dist is not None:
                _broadcast(dist, None)
            raise NotEnoughFeedback(message)
        if dist is not None:
            _broadcast(dist, {"run_id": run_id, "watermark": watermark, "active": store.active_version()})
        summary = _train_and_register(store, run_id, snap, config, data_dir, model_name, report, progress,
                                      dist=dist)
        outcome = "candidate"
        if config.promote:
            from online_rl.gate import apply

            report(f"gate: judging {summary['version']}", stage="gate")
            verdict = apply(store, summary["version"], summary["evaluation"], config.gate)
            summary["gate"] = verdict.as_dict()
            outcome = "promoted" if verdict.passed else "not promoted"
            report(f"gate: {summary['version']} {outcome}: {verdict.reason()}")
        summary.update(feedback=counts, seconds=round(time.perf_counter() - started, 1),
                       peak_memory_mb=peak_memory_mb())
        store.finish_run(run_id, "succeeded", metrics=summary)
        report(f"run {run_id} succeeded: {summary['version']} {outcome} in {summary['seconds']:.0f} s",
               stage="done")
        return {"run_id": run_id, "status": "succeeded", **summary}
    except NotEnoughFeedback:
        raise
    except BaseException as exc:  # noqa: BLE001 - recorded, then raised again
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if type(exc).__name__ in ("OutOfMemoryError", "MemoryError"):
            error += (" (out of memory during the retrain: see the memory plan in docs/deploy.md; "
                      "--quantize, --train-device or fewer PPO rollouts)")
        elif dist is not None and any(sign in str(exc) for sign in ("closed by peer", "Connection reset",
                                                                    "ProcessGroupNCCL", "NCCL communicator")):
            error += " (another training process stopped first: its error is in the retrain's log)"
        store.finish_run(run_id, "failed", error=error,
                         metrics={"stage": stage.get("stage"), "traceback": traceback.format_exc()[-4000:],
                                  "seconds": round(time.perf_counter() - started, 1)})
        if isinstance(exc, Exception):
            raise CycleFailed(f"run {run_id} failed during {stage.get('stage')}: {error}") from exc
        raise


def _worker(store, data_dir: Path, model_name: str, config: CycleConfig, dist) -> dict:
    """A process other than the main one: same snapshot, its share of PPO."""
    job = _broadcast(dist, None)
    if job is None:  # the main process refused or failed before starting
        return {"status": "worker", "process_index": dist.process_index, "trained": False}
    try:
        _engine(config)
    except ValueError:  # the main process records the refusal as the run's error
        return {"status": "worker", "process_index": dist.process_index, "trained": False}
    snap = snapshot(store, config.data, job["watermark"])
    _train_and_register(store, job["run_id"], snap, config, data_dir, model_name, lambda line, **f: None,
                        lambda line: None, dist=dist, active=job["active"])
    return {"status": "worker", "process_index": dist.process_index, "trained": True}


def _engine(config: CycleConfig) -> str:
    """`training_engine`, and a quantized base refused under FSDP: its 8-bit
    weights cannot be sharded and its 4-bit ones are left whole by
    accelerate, so the run would not fit where the plan says it does."""
    from online_rl.ppo import training_engine

    engine = training_engine()
    if engine == "fsdp2" and config.quantize != "none":
        raise ValueError(f"--quantize {config.quantize} does not combine with FSDP retrains: shard the base "
                         "unquantized, or train quantized without FSDP (DDP or one process)")
    return engine


def _gather_sharded_adapter(trainer, main: bool) -> tempfile.TemporaryDirectory | None:
    """After PPO under FSDP: the trained adapter, saved whole into a temporary
    directory by the main process (None on the others). Every process must
    call it (the LoRA weights are gathered from their shards).

    The sharded model cannot be evaluated or saved by the main process alone
    (every forward pass is a collective), so the main process then loads the
    base again, whole, with this adapter (`_reload_with_adapter`), as serving
    will. That needs one whole copy of the base per GPU for inference, which
    serving needs anyway; sharding is what saves the training memory (the
    policy's weights, gradients and optimizer state, and the rollouts' KV
    cache, each process holding a share)."""
    weights = trainer.gather_adapter()
    scratch = tempfile.TemporaryDirectory(prefix="chatbot-gathered-") if main else None
    if main:
        trainer.unwrapped.policy.save_pretrained(scratch.name, state_dict=weights)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.free_memory()  # drops accelerate's references to the sharded model
    return scratch


def _reload_with_adapter(adapter_dir: str, model_name: str, data_dir: Path, config: CycleConfig):
    import gc

    import torch
    from peft import PeftModel

    from chatbot.models import load_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    base = load_model(model_name, data_dir, device=config.device, quantize=config.quantize)
    return PeftModel.from_pretrained(base.model, adapter_dir)


def _train_and_register(store, run_id, snap, config: CycleConfig, data_dir: Path, model_name: str, report,
                        progress_line, *, dist=None, active: str | None = None):
    import torch

    main = dist is None or dist.is_main_process
    if dist is not None:
        if _engine(config) == "fsdp2":  # refuses what retrains do not run on first (see _worker)
            # Every process needs whole weights for its reward model (and the
            # base is whole on each device before FSDP shards it), so each one
            # reads them itself; with accelerate's "CPU RAM efficient loading"
            # transformers would give all but the first process empty (meta)
            # weights.
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"

    from chatbot.models import (load_model, load_tokenizer, quantization_config, resolve_device,
                                resolve_model_path)

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    # The policy's copy of the base is loaded after the reward model has been
    # trained: the two are never both in memory with the reward model's
    # training state (what the memory plan counts on for a sharded retrain).
    report(f"loading the tokenizer of {model_name!r}", stage="load")
    device = resolve_device(config.device)
    quantization_config(config.quantize, device)  # refuses early when bitsandbytes or the GPU is missing
    base_path = resolve_model_path(model_name, data_dir)
    tokenizer = load_tokenizer(base_path, name=model_name)
    tokenizer.padding_side = "left"

    active = active or store.active_version()
    active_row = store.get_adapter(active) if active != "v0" else None
    active_path = active_row["path"] if active_row and Path(active_row["path"]).exists() else None
    if active_row and not active_path:
        raise FileNotFoundError(f"the active adapter {active} is missing from {active_row['path']}")

    # -- reward model ---------------------------------------------------------
    rm_base = resolve_model_path(config.reward_model, data_dir) if config.reward_model else base_path
    rm_tokenizer = tokenizer if rm_base == base_path else load_tokenizer(rm_base)
    previous = latest_reward_model(store)
    reward_path = None
    reward_metrics = None
    from online_rl.reward import load_reward_model, train_reward_model

    if not main:  # the main process trains the reward model; the others load what it saved
        reward_path = Path(_broadcast(dist, None))
        rm = load_reward_model(rm_base, str(reward_path), rm_tokenizer, device)
    elif config.method == "ppo" or previous is None:
        report("reward model: training" + (f" from {previous}" if previous else ""), stage="reward_model")
        rm, reward_metrics = train_reward_model(rm_base, rm_tokenizer, snap, config.reward, device=device,
                                                previous=previous, progress=lambda line: report(line))
        reward_path = data_dir / REWARD_DIR / f"run-{run_id}"
        reward_path.parent.mkdir(parents=True, exist_ok=True)
        rm.save(reward_path, reward_metrics)
        report(f"reward model: held-out AUC {reward_metrics['auc']}, accuracy {reward_metrics['accuracy']}, "
               f"pair accuracy {reward_metrics['pair_accuracy']}")
    else:
        rm = load_reward_model(rm_base, previous, rm_tokenizer, device)
        reward_path = Path(previous)
        report(f"reward model: reusing {previous} to judge the candidate", stage="reward_model")
    if dist is not None and main:
        _broadcast(dist, str(reward_path))

    def reward_fn(prompts, replies):
        # P(thumbs-up): bounded, so the KL penalty and the missing-EOS penalty
        # keep a fixed meaning whatever the scale of the reward model's logits.
        return torch.sigmoid(torch.tensor(rm.score(prompts, replies))).tolist()

    # -- policy update --------------------------------------------------------
    from peft import PeftModel

    report(f"loading base model {model_name!r}", stage="load")
    loaded = load_model(model_name, data_dir, device=config.device, quantize=config.quantize)

    # PPO continues from the active adapter: its on-policy steps build on what
    # earlier cycles learned, and its KL penalty is always to the base. KTO is
    # an offline method over all the replayed thumbs: starting it again from
    # an adapter already trained on the same thumbs compounds its epochs
    # (measured: KL to the base past 40 nats by the third cycle), so each KTO
    # cycle trains a fresh adapter on the base.
    if active_path and config.method == "ppo":
        policy = PeftModel.from_pretrained(loaded.model, active_path, is_trainable=True)
        start_from = active
    else:
        policy, start_from = None, "v0"
    if config.method == "ppo":
        from online_rl.ppo import PPOTrainer, add_lora

        if policy is None:
            policy = add_lora(loaded.model, config.ppo)
        prompts = snap.prompts or [e.prompt for e in snap.train]
        report(f"ppo: {config.ppo.steps} steps of {config.ppo.rollouts} rollouts on {len(prompts)} prompts, "
               f"from {start_from}", stage="policy")

        def on_step(record):
            report(f"ppo: step {record['step']}/{config.ppo.steps} done", step=record["step"],
                   of=config.ppo.steps, last=record)

        trainer = PPOTrainer(policy, tokenizer, config.ppo, progress=lambda line: progress_line(line),
                             on_step=on_step)
        history = trainer.train(prompts, reward_fn)
        train_metrics = {"steps": len(history), "first": history[0], "last": history[-1],
                         "history": history, "sharded": trainer.sharded}
        if trainer.sharded:
            report("ppo: gathering the adapter from its shards")
            gathered = _gather_sharded_adapter(trainer, main)
            del trainer, policy  # the sharded model goes before a whole copy is loaded
            loaded.model = None
            if not main:
                return None
            report("evaluation: loading the base whole, with the adapter")
            with gathered:
                policy = _reload_with_adapter(gathered.name, model_name, data_dir, config)
        else:
            policy = trainer.unwrapped.policy
    else:
        from online_rl.kto import train_kto

        report(f"kto: {len(snap.train)} rated replies, from {start_from}", stage="policy")
        policy, train_metrics = train_kto(loaded.model, tokenizer, snap.train,
                                          config.kto, progress=lambda line: report(line),
                                          device=str(device.type))
    policy.eval()
    if not main:  # evaluation and registration are the main process's
        return None

    # -- evaluation -----------------------------------------------------------
    report("evaluation: candidate against " + active, stage="evaluation")
    held = snap.heldout_prompts or [e.prompt for e in snap.heldout] or snap.prompts
    evaluation = compare(policy, tokenizer, held, reward_fn, config.eval, active_adapter=active_path)
    evaluation["active_version"] = active
    report(f"evaluation: win rate {evaluation['win_rate']} against {active}, KL to base "
           f"{evaluation['kl_to_base']} nats, distinct replies {evaluation['candidate']['distinct_fraction']}")

    # -- registration ---------------------------------------------------------
    report("saving the adapter", stage="register")
    adapters = data_dir / ADAPTERS_DIR
    adapters.mkdir(parents=True, exist_ok=True)
    scratch = adapters / f".run-{run_id}.partial"
    # This is the only run going (start_run is exclusive): any other scratch
    # directory is what a killed run left behind. None of them is ever loaded.
    for leftover in adapters.glob(".run-*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    policy.save_pretrained(str(scratch))
    version = store.allocate_version()
    final = adapters / version
    metrics = {
        "method": config.method,
        "processes": dist.num_processes if dist is not None else 1,
        "parent": start_from,
        "reward_model": reward_metrics,
        "reward_model_path": str(reward_path) if reward_path else None,
        "train": train_metrics,
        "evaluation": evaluation,
        "adapter_mb": dir_size_mb(scratch),
        "base_mb": dir_size_mb(loaded.path) if Path(loaded.path).exists() else None,
    }
    description = {
        "version": version, "base_model": model_name, "base_path": loaded.path, "method": config.method,
        "parent": start_from, "run_id": run_id, "watermark": snap.watermark,
        "config": dataclasses.asdict(config), "metrics": {k: v for k, v in metrics.items() if k != "train"},
    }
    # adapter.json is written last, then the directory is renamed into place:
    # a crash leaves only a .partial directory, which is never loaded.
    (scratch / "adapter.json").write_text(json.dumps(description, indent=2, default=str))
    os.replace(scratch, final)
    compact = {k: v for k, v in metrics.items() if k != "train"}
    compact["train"] = {k: v for k, v in train_metrics.items() if k != "history"}
    store.register_adapter(version, path=str(final), base_model=model_name, run_id=run_id,
                           status="candidate", metrics=compact, watermark=snap.watermark)
    return {"version": version, "path": str(final), **metrics}
