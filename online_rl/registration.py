"""Phase 5 of a retrain cycle: the candidate written to disk and registered.

The adapter is saved into a scratch directory (``adapters/.run-K.partial``),
described by ``adapter.json`` (base model, method, watermark, config,
metrics, the KL coefficient the next cycle continues from), and renamed to
``adapters/vN`` with a never-reused version; the `adapters` row gets status
candidate. A crash leaves only a ``.partial`` directory, which is never
loaded and is removed by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from online_rl.data import Snapshot

ADAPTERS_DIR = "adapters"


def dir_size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)



def register(job, snap: Snapshot, policy, parent: str, rewards, train_metrics: dict,
             evaluation: dict, base_path: str) -> dict:
    config = job.config
    job.report("saving the adapter", stage="register")
    adapters = job.data_dir / ADAPTERS_DIR
    adapters.mkdir(parents=True, exist_ok=True)
    scratch = adapters / f".run-{job.run_id}.partial"
    # This is the only run going (start_run is exclusive): any other scratch
    # directory is what a killed run left behind. None of them is ever loaded.
    for leftover in adapters.glob(".run-*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    policy.save_pretrained(str(scratch))
    version = job.store.allocate_version()
    final = adapters / version
    metrics = {
        "method": config.method,
        "processes": job.dist.num_processes if job.dist is not None else 1,
        "parent": parent,
        "reward_model": rewards.metrics,
        "reward_model_path": str(rewards.path) if rewards.path else None,
        "judge_model": rewards.judge_metrics,
        "judge_model_path": str(rewards.judge_path) if rewards.judge_path else None,
        "kl_coef": train_metrics.get("kl_coef"),
        "train": train_metrics,
        "evaluation": evaluation,
        "adapter_mb": dir_size_mb(scratch),
        "base_mb": dir_size_mb(base_path) if Path(base_path).exists() else None,
    }
    description = {
        "version": version, "base_model": job.model_name, "base_path": base_path, "method": config.method,
        "parent": parent, "run_id": job.run_id, "watermark": snap.watermark,
        "config": dataclasses.asdict(config), "metrics": {k: v for k, v in metrics.items() if k != "train"},
    }
    # adapter.json is written last, then the directory is renamed into place:
    # a crash leaves only a .partial directory, which is never loaded.
    (scratch / "adapter.json").write_text(json.dumps(description, indent=2, default=str))
    os.replace(scratch, final)
    compact = {k: v for k, v in metrics.items() if k != "train"}
    compact["train"] = {k: v for k, v in train_metrics.items() if k != "history"}
    job.store.register_adapter(version, path=str(final), base_model=job.model_name, run_id=job.run_id,
                               status="candidate", metrics=compact, watermark=snap.watermark)
    return {"version": version, "path": str(final), **metrics}
