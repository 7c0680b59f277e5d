"""The retrain cycle under `accelerate launch` with two CPU processes (gloo),
started by the scheduler as `--train-launcher accelerate` starts it.

(accelerate 1.15's `--cpu` flag starts a single process whatever
`--num_processes` says; two CPU processes come from its torchrun launcher.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


def _args(data_dir, model, **extra):
    argv = ["serve", "--data-dir", str(data_dir), "--model", str(model), "--device", "cpu",
            "--train-launcher", "accelerate", "--train-processes", "2", "--min-new-feedback", "10"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return app.build_parser().parse_args(argv)


def test_the_launcher_command_line(data_dir, tiny_model_dir):
    argv = app.retrain_command(_args(data_dir, tiny_model_dir))("ppo", 1)
    assert argv[:6] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu"]
    assert argv[6:8] == [str(ROOT / "app.py"), "retrain"] and "--threads" in argv
    with_config = app.retrain_command(_args(data_dir, tiny_model_dir, accelerate_config="zero3.yaml"))("ppo", 1)
    assert with_config[3:5] == ["--config_file", "zero3.yaml"] and "--num_processes" not in with_config
    plain = app.retrain_command(app.build_parser().parse_args(["serve", "--data-dir", str(data_dir)]))("kto", 2)
    assert plain[:3] == [sys.executable, str(ROOT / "app.py"), "retrain"]


@pytest.mark.slow
def test_two_cpu_processes_complete_one_cycle_and_one_adapter(store, data_dir, tiny_model_dir):
    from online_rl.scheduler import RetrainScheduler, ScheduleConfig
    from tests.test_retrain import _thumbs

    command = app.retrain_command(_args(data_dir, tiny_model_dir))
    argv = lambda method, threads: [*command(method, threads), "--ppo-steps", "2", "--min-feedback", "10"]  # noqa: E731
    scheduler = RetrainScheduler(store, argv, ScheduleConfig(every_s=0, min_new_feedback=10, threads=1),
                                 log_dir=data_dir / "logs")
    _thumbs(store, 40)
    started = scheduler.check()
    assert started["start"], started
    assert scheduler.wait_for_child(300) == 0, Path(started["log"]).read_text()[-3000:]
    log = Path(started["log"]).read_text()
    runs = store.runs(10)
    assert [r["status"] for r in runs] == ["succeeded"]  # one run, recorded by the main process only
    assert runs[0]["pid"] != started["pid"]  # the main worker, not the launcher
    assert runs[0]["metrics"]["processes"] == 2
    assert runs[0]["metrics"]["train"]["steps"] == 2
    assert [a["version"] for a in store.adapters()] == ["v1"]
    assert Path(store.get_adapter("v1")["path"], "adapter_model.safetensors").exists()
    summaries = [line for line in log.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["version"] == "v1"
