"""One retrain cycle: feedback in, a candidate adapter out.

It reads top to bottom as its phases, each a function of its own:

1. **snapshot**: the store up to a watermark (the newest feedback id now),
   split by conversation, weighted so that no rater holds more than their
   bounded share (`online_rl.influence`). Too little feedback: the run is
   recorded as refused and `NotEnoughFeedback` is raised (the CLI exits 2).
2. **reward models** (`online_rl.reward_models`): the *policy's* reward
   model on the training side, and the *judge*, which the policy update never sees, on the
   held-out side. A policy reward model no better than chance on held-out
   thumbs (its AUC's 95% interval includes 0.5) trains no policy: the run is
   refused as "waiting for more feedback" and `NotEnoughFeedback` is raised.
3. **policy** (`online_rl.policy_update`): from the active version's
   adapter, sampling as the bot serves, the tilt (the default: its own
   replies re-weighted by the policy's reward model, `online_rl.tilt`) or PPO
   against that reward model's logits; or KTO straight from the thumbs on a
   fresh adapter.
4. **evaluation** of the candidate against the active version and the base on
   held-out prompts (`online_rl.evaluate`).
5. **registration** (`online_rl.registration`): ``adapters/vN``, described
   by its ``adapter.json``, registered as a candidate.
6. **gate** (when `promote` is set, as the scheduler, ``app.py retrain`` and
   the simulation do): the candidate becomes active if it passes
   `online_rl.gate`, else it is rejected with the reasons. A running server
   notices the new active version in the database and hot-swaps it in.

Every run is a row in `runs`: running while it works (with live progress),
then succeeded, refused or failed with the error. Nothing fails silently.
Under ``accelerate launch`` the main process does everything that touches the
database and the disk; the others (`_worker`) take part in PPO only
(`online_rl.distributed`).
"""

from __future__ import annotations

import dataclasses
import itertools
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chatbot.models import GenerationSettings
from online_rl import METHODS
from online_rl.data import DataConfig, Snapshot, snapshot
from online_rl.distributed import broadcast, check_engine, process_group
from online_rl.evaluate import EvalConfig
from online_rl.gate import GateConfig, check_canary_share
from online_rl.kto import KTOSettings
from online_rl.ppo import PPOConfig
from online_rl.registration import register
from online_rl.reward import RewardConfig
from online_rl.reward_models import NotInformative, Rewards, scorer, train_reward_models
from online_rl.policy_update import prompt_pool, update_policy
from online_rl.tilt import TiltConfig, validation_split
from storage import Store
from storage.common import prompt_hash

ProgressFn = Callable[[str], None]


class NotEnoughFeedback(Exception):
    """Too little (or too uninformative) feedback for a run; the message says
    how much there is and what is needed, `metrics` what was measured."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


class CycleFailed(Exception):
    """A run failed; it is recorded in `runs` with this error."""


@dataclass
class CycleConfig:
    method: str = METHODS[0]
    min_feedback: int = 20  # rated replies needed
    device: str = "auto"
    quantize: str = "none"  # none, 8bit or 4bit: the base loaded through bitsandbytes (a GPU)
    reward_model: str | None = None  # base of the reward models; None: the policy's base
    threads: int = 0  # torch threads for training; 0 leaves torch's default
    seed: int = 0
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # as the bot serves
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kto: KTOSettings = field(default_factory=KTOSettings)
    tilt: TiltConfig = field(default_factory=TiltConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promote: bool = False  # apply the gate: promote the candidate if it passes, else reject it
    canary: float = 0.0  # above 0: a candidate that passes goes on canary on this share of conversations

    def validate(self) -> CycleConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.min_feedback < 2:
            raise ValueError("min_feedback must be at least 2")
        check_canary_share(self.canary)
        self.ppo.validate()
        self.tilt.validate()
        self.generation.validate()
        self.data.validate()
        return self

    def rollout_settings(self) -> GenerationSettings:
        """How rollouts and evaluation sample: as the bot serves. A bot that
        answers greedily still learns from samples at temperature 1: greedy
        rollouts would all be the same reply, and there would be nothing to
        compare."""
        if self.generation.sampling:
            return self.generation
        return dataclasses.replace(self.generation, temperature=1.0, top_p=1.0)


@dataclass
class Job:
    """What every phase of one run needs."""

    store: Store
    run_id: int
    config: CycleConfig
    data_dir: Path
    model_name: str
    report: Callable
    progress: ProgressFn
    dist: object = None
    active: str = "v0"

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main_process


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def summary_line(result: dict) -> dict:
    """The run's summary without the per-step history and the sample replies."""
    evaluation = {k: v for k, v in (result.get("evaluation") or {}).items() if k != "examples"}
    train = {k: v for k, v in (result.get("train") or {}).items() if k not in ("history", "first", "last")}
    return {**{k: v for k, v in result.items() if k not in ("train", "evaluation")},
            "train": train, "evaluation": evaluation}


# -- the run --------------------------------------------------------------------


def run_cycle(store: Store, *, data_dir: str | Path, model_name: str = "starter",
              config: CycleConfig | None = None, progress: ProgressFn = print) -> dict:
    """Run one cycle and return its summary (also stored as the run's metrics).

    Under ``accelerate launch`` with several processes the other processes
    return ``{"status": "worker"}``."""
    config = (config or CycleConfig()).validate()
    data_dir = Path(data_dir)
    dist = process_group(config.device)
    if dist is not None:
        if config.method != "ppo":
            raise ValueError(f"several training processes run PPO only; run {config.method} in one process")
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
            broadcast(None)  # tell the other processes there is no run
        raise
    started = time.perf_counter()
    stage = {"stage": "snapshot"}

    def report(line: str, **fields) -> None:
        stage.update(fields)
        stage["message"] = line
        stage["elapsed_s"] = round(time.perf_counter() - started, 1)
        progress(line)
        store.update_run_progress(run_id, stage)

    job = Job(store, run_id, config, data_dir, model_name, report, progress, dist, store.active_version())
    snap = None
    try:
        snap = take_snapshot(job, watermark)
        if dist is not None:
            broadcast({"run_id": run_id, "watermark": watermark, "active": job.active})
        summary = train_and_register(job, snap)
        outcome = "candidate"
        if config.promote:
            from online_rl.gate import apply

            report(f"gate: judging {summary['version']}", stage="gate")
            verdict = apply(store, summary["version"], summary["evaluation"], config.gate, canary=config.canary)
            summary["gate"] = verdict.as_dict()
            outcome = ("on canary" if config.canary else "promoted") if verdict.passed else "not promoted"
            report(f"gate: {summary['version']} {outcome}: {verdict.reason()}")
        summary.update(feedback=snap.counts(), rater_shares=snap.rater_shares(),
                       seconds=round(time.perf_counter() - started, 1), peak_memory_mb=peak_memory_mb())
        store.finish_run(run_id, "succeeded", metrics=summary)
        report(f"run {run_id} succeeded: {summary['version']} {outcome} in {summary['seconds']:.0f} s",
               stage="done")
        return {"run_id": run_id, "status": "succeeded", **summary}
    except NotEnoughFeedback as exc:
        store.finish_run(run_id, "refused", error=str(exc), metrics={"stage": stage.get("stage"), **exc.metrics})
        if dist is not None and stage.get("stage") == "snapshot":
            broadcast(None)  # the other processes are still waiting for the job
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
                                  "seconds": round(time.perf_counter() - started, 1),
                                  **({"rater_shares": snap.rater_shares()} if snap is not None else {})})
        if isinstance(exc, Exception):
            raise CycleFailed(f"run {run_id} failed during {stage.get('stage')}: {error}") from exc
        raise


def _worker(store, data_dir: Path, model_name: str, config: CycleConfig, dist) -> dict:
    """A process other than the main one: same snapshot, its share of PPO."""
    job_facts = broadcast(None)
    if job_facts is None:  # the main process refused or failed before starting
        return {"status": "worker", "process_index": dist.process_index, "trained": False}
    try:
        check_engine(config.quantize)
    except ValueError:  # the main process records the refusal as the run's error
        return {"status": "worker", "process_index": dist.process_index, "trained": False}
    job = Job(store, job_facts["run_id"], config, data_dir, model_name, lambda line, **f: None, lambda line: None,
              dist, job_facts["active"])
    snap = snapshot(store, config.data, job_facts["watermark"])
    try:
        train_and_register(job, snap)
    except NotEnoughFeedback:  # the main process refused after the reward model; it records why
        return {"status": "worker", "process_index": dist.process_index, "trained": False}
    return {"status": "worker", "process_index": dist.process_index, "trained": True}


# -- 1. snapshot -------------------------------------------------------------------


def take_snapshot(job: Job, watermark: int) -> Snapshot:
    snap = snapshot(job.store, job.config.data, watermark)
    counts = snap.counts()
    job.report(f"snapshot: {counts['examples']} rated replies ({counts['up']} up, {counts['down']} down), "
               f"{counts['train_pairs'] + counts['heldout_pairs']} pairs, {counts['prompts']} prompts, "
               f"{counts['raters']} raters, watermark {watermark}")
    shares = snap.rater_shares()
    top = shares["thumbs"]["top"]
    if top and top[0]["share_before"] > top[0]["share_after"]:
        job.report(f"snapshot: rater bound {shares['thumbs']['bound']:.0%} of the thumbs: {top[0]['rater']} "
                   f"down from {top[0]['share_before']:.0%} to {top[0]['share_after']:.0%}")
    if counts["examples"] < job.config.min_feedback or not snap.train:
        raise NotEnoughFeedback(f"not enough feedback to retrain: {counts['examples']} rated replies, at least "
                                f"{job.config.min_feedback} needed (--min-feedback)",
                                {"feedback": counts, "rater_shares": shares})
    return snap


def train_and_register(job: Job, snap: Snapshot) -> dict | None:
    """Phases 2 to 5; None on the processes other than the main one."""
    import torch

    config = job.config
    if job.dist is not None:
        check_engine(config.quantize)  # refuses what retrains do not run on first (see _worker)
    from chatbot.models import load_tokenizer, quantization_config, resolve_device, resolve_model_path

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    job.report(f"loading the tokenizer of {job.model_name!r}", stage="load")
    device = resolve_device(config.device)
    quantization_config(config.quantize, device)  # refuses early when bitsandbytes or the GPU is missing
    base_path = resolve_model_path(job.model_name, job.data_dir)
    tokenizer = load_tokenizer(base_path, name=job.model_name)
    tokenizer.padding_side = "left"
    active_row = job.store.get_adapter(job.active) if job.active != "v0" else None
    active_path = active_row["path"] if active_row and Path(active_row["path"]).exists() else None
    if active_row and not active_path:
        raise FileNotFoundError(f"the active adapter {job.active} is missing from {active_row['path']}")

    try:
        rewards = train_reward_models(job, snap, base_path, tokenizer, device)
    except NotInformative as exc:
        raise NotEnoughFeedback(str(exc), exc.metrics) from None
    policy, parent, train_metrics = update_policy(job, snap, tokenizer, device, rewards, active_path)
    if policy is None:  # a process other than the main one: its part is done
        return None
    evaluation = evaluate_candidate(job, snap, policy, tokenizer, rewards, active_path)
    return register(job, snap, policy, parent, rewards, train_metrics, evaluation, base_path)


# -- 4. evaluation --------------------------------------------------------------------


def judged_prompts(snap: Snapshot, config: CycleConfig) -> list:
    """The prompts the candidate is judged on: the pool's held-out side and,
    after a tilt, its validation prompts, which no tilt trains on either
    (`online_rl.tilt.validation_split`). Prompts differ in how far a
    candidate's language drifts on them: on one `concise` round the held-out
    side measured the candidate 9% above the base, the validation prompts
    40%, and 200 other prompts 22%; the gate judges on as many as it has,
    up to `EvalConfig.max_prompts` (the tilt's epoch stop on the same ones)."""
    held = snap.heldout_prompts or [e.prompt for e in snap.heldout] or snap.prompts
    if config.method != "tilt" or not snap.heldout_prompts:
        return held[: config.eval.max_prompts]
    pool, _ = prompt_pool(snap)
    seen = {prompt_hash(p) for p in held}
    extra = [p for p, v in zip(pool, validation_split(pool, config.tilt.validation_share))
             if v and prompt_hash(p) not in seen]
    # interleaved, so that the cap on the prompts (EvalConfig.max_prompts) keeps some of each
    both = [p for pair in itertools.zip_longest(held, extra) for p in pair if p is not None]
    return both[: config.eval.max_prompts]


def evaluate_candidate(job: Job, snap: Snapshot, policy, tokenizer, rewards: Rewards, active_path) -> dict:
    from online_rl.evaluate import compare

    job.report(f"evaluation: candidate against {job.active} and the base", stage="evaluation")
    held = judged_prompts(snap, job.config)
    evaluation = compare(policy, tokenizer, held, job.config.rollout_settings(), scorer(rewards.policy),
                         job.config.eval, judge_fn=scorer(rewards.judge) if rewards.judge else None,
                         heldout_examples=snap.heldout, active_adapter=active_path)
    evaluation["active_version"] = job.active
    evaluation["judge_informative"] = rewards.judge_informative
    job.report(f"evaluation: win rate {evaluation['win_rate']} (judge {evaluation['judge_win_rate']}) against "
               f"{job.active}, KL to base {evaluation['kl_per_token']} nats per token, base NLL per token "
               f"{evaluation['base_nll']}, excess NLL per token {evaluation['excess_nll']}, known words "
               f"{evaluation['known_words']}")
    return evaluation
