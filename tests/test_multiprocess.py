"""The retrain cycle under `accelerate launch` with two CPU processes (gloo),
started by the scheduler as `--train-launcher accelerate` starts it: DDP,
and FSDP (version 2) from an accelerate config file.

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
    with_config = app.retrain_command(_args(data_dir, tiny_model_dir, accelerate_config="fsdp.yaml"))("ppo", 1)
    assert with_config[3:5] == ["--config_file", "fsdp.yaml"] and "--num_processes" not in with_config
    plain = app.retrain_command(app.build_parser().parse_args(["serve", "--data-dir", str(data_dir)]))("kto", 2)
    assert plain[:3] == [sys.executable, str(ROOT / "app.py"), "retrain"]


FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: {version}
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_training_engine_from_the_launcher_environment():
    from online_rl.distributed import training_engine

    assert training_engine({}) == "ddp"
    assert training_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    with pytest.raises(ValueError, match="fsdp_version: 2.*version 1"):
        training_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(ValueError, match="DeepSpeed"):
        training_engine({"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match="fsdp_offload_params: false"):
        training_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"})


def test_a_quantized_base_is_refused_under_fsdp_only(monkeypatch):
    from online_rl.distributed import check_engine

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS", raising=False)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert check_engine("none") == "fsdp2"
    with pytest.raises(ValueError, match="--quantize 4bit does not combine with FSDP"):
        check_engine("4bit")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert check_engine("4bit") == "ddp"


def _scheduled_retrain(store, data_dir, tiny_model_dir, **extra):
    """One retrain started by the scheduler through `accelerate launch`: its log."""
    from online_rl.scheduler import RetrainScheduler, ScheduleConfig
    from tests.test_retrain import _thumbs

    command = app.retrain_command(_args(data_dir, tiny_model_dir, **extra))
    argv = lambda method, threads: [*command(method, threads), "--ppo-steps", "2", "--min-feedback", "10"]  # noqa: E731
    scheduler = RetrainScheduler(store, argv, ScheduleConfig(every_s=0, min_new_feedback=10, threads=1, method="ppo"),
                                 log_dir=data_dir / "logs")
    _thumbs(store, 40)
    started = scheduler.check()
    assert started["start"], started
    scheduler.wait_for_child(300)
    log = Path(started["log"]).read_text()
    runs = store.runs(10)
    assert len(runs) == 1, log[-3000:]  # one run, recorded by the main process only
    assert runs[0]["pid"] != started["pid"]  # the main worker, not the launcher
    return runs[0], log


@pytest.mark.slow
def test_two_cpu_processes_complete_one_cycle_and_one_adapter(store, data_dir, tiny_model_dir):
    run, log = _scheduled_retrain(store, data_dir, tiny_model_dir)
    assert run["status"] == "succeeded", log[-3000:]
    assert run["metrics"]["processes"] == 2
    assert run["metrics"]["train"]["steps"] == 2 and run["metrics"]["train"]["sharded"] is False
    assert [a["version"] for a in store.adapters()] == ["v1"]
    assert Path(store.get_adapter("v1")["path"], "adapter_model.safetensors").exists()
    summaries = [line for line in log.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["version"] == "v1"


@pytest.mark.slow
def test_fsdp_shards_the_policy_over_two_cpu_processes_and_saves_one_whole_adapter(
        store, data_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG.format(version=2))
    run, log = _scheduled_retrain(store, data_dir, tiny_model_dir, accelerate_config=config)
    assert run["status"] == "succeeded", log[-3000:]
    assert run["metrics"]["processes"] == 2 and run["metrics"]["train"]["sharded"] is True
    assert "gathering the adapter from its shards" in log
    assert [a["version"] for a in store.adapters()] == ["v1"]
    # Whole LoRA matrices (not one process's half), and trained: B starts at zero.
    weights = load_file(Path(store.get_adapter("v1")["path"], "adapter_model.safetensors"))
    hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    q_a = next(v for k, v in weights.items() if k.endswith("q_proj.lora_A.weight"))
    assert tuple(q_a.shape) == (16, hidden)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    # The candidate was evaluated whole on the main process, and serving loads it.
    assert run["metrics"]["evaluation"]["prompts"] >= 1
    from chatbot.models import load_model
    from chatbot.policy import Policy

    policy = Policy(load_model(str(tiny_model_dir), data_dir, device="cpu"))
    policy.swap_to("v1", store.get_adapter("v1")["path"])
    assert policy.version == "v1"


@pytest.mark.slow
def test_an_fsdp_version_1_config_is_a_failed_run_that_says_why(store, data_dir, tiny_model_dir, tmp_path):
    config = tmp_path / "fsdp1.yaml"
    config.write_text(FSDP2_CONFIG.format(version=1))
    run, log = _scheduled_retrain(store, data_dir, tiny_model_dir, accelerate_config=config)
    assert run["status"] == "failed" and "fsdp_version: 2" in run["error"], run
    assert store.adapters() == []


def test_serving_with_several_training_processes_needs_ppo(data_dir, tiny_model_dir, capsys):
    argv = ["serve", "--data-dir", str(data_dir), "--model", str(tiny_model_dir), "--device", "cpu",
            "--train-launcher", "accelerate", "--train-processes", "2", "--port", "0"]
    assert app.main(argv) == 2
    assert "several training processes run PPO only: add --retrain-method ppo" in capsys.readouterr().err
