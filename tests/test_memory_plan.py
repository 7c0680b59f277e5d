"""The memory plan: estimated from a config, refusing what cannot fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatbot import memory

ROOT = Path(__file__).resolve().parents[1]
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)


@pytest.fixture(scope="module")
def qwen7b():
    from transformers import Qwen2Config

    return memory.model_shape(Qwen2Config(**QWEN_7B))


def test_shape_counts_parameters_from_the_config_alone(qwen7b):
    assert 7.5e9 < qwen7b.params < 7.7e9  # Qwen2.5-7B has 7.6B parameters
    assert qwen7b.kv_width == 4 * 128 and qwen7b.layers == 28


def test_an_impossible_configuration_is_refused_with_its_numbers(qwen7b):
    plans = [memory.serving_plan(qwen7b, "cuda:0", 2), memory.training_plan(qwen7b, "cuda:0", 2)]
    with pytest.raises(memory.MemoryPlanError) as refused:
        memory.check(plans, available=lambda device: 24 * memory.GIB, hints=memory.HINTS)
    message = str(refused.value)
    assert message.startswith("not enough memory on cuda:0: serving needs 15.")
    assert "one retrain needs 4" in message and "weights 14.19" in message
    assert "but cuda:0 has 24.00 GiB free" in message and "--quantize 4bit" in message


def test_quantizing_or_a_second_gpu_makes_it_fit(qwen7b):
    serving = memory.serving_plan(qwen7b, "cuda:0", 2, quantize="4bit")
    assert serving.total < 8 * memory.GIB
    training = memory.training_plan(qwen7b, "cuda:1", 2)
    report = memory.check([serving, training], available=lambda device: 80 * memory.GIB)
    assert set(report) == {"cuda:0", "cuda:1"} and report["cuda:0"]["need_gib"] < 8


def test_the_serving_plan_counts_the_batch_s_kv_cache_and_refuses_a_batch_that_cannot_fit(qwen7b):
    one = memory.serving_plan(qwen7b, "cuda:0", 2)
    # K and V, layers, kv width, bf16, context; a reply's own row and its shadow's on the base
    per_row = 2 * 28 * 512 * 2 * 4096 * 2
    assert one.parts["KV cache"] == per_row and one.batch == 1
    assert memory.with_batch(one, 32).parts["KV cache"] == 32 * per_row
    free = 24 * memory.GIB
    fits = memory.largest_batch([one], available=lambda device: free)
    assert fits == int((0.9 * free - (one.total - per_row)) // per_row)
    assert memory.check([memory.with_batch(one, fits)], available=lambda device: free)
    with pytest.raises(memory.MemoryPlanError):
        memory.check([memory.with_batch(one, fits + 1)], available=lambda device: free)
    with pytest.raises(memory.MemoryPlanError, match=f"--max-batch 200 does not fit on cuda:0: .* use --max-batch {fits}$"):
        memory.serving_batch([one], 200, available=lambda device: free)
    assert memory.serving_batch([one], fits, available=lambda device: free) == fits
    assert memory.serving_batch([one], None, available=lambda device: free) == min(fits, 32)
    # a retrain on the same GPU leaves fewer rows
    beside = memory.largest_batch([one, memory.training_plan(qwen7b, "cuda:0", 2, quantize="4bit")],
                                  available=lambda device: 80 * memory.GIB)
    assert 0 < beside < memory.largest_batch([one], available=lambda device: 80 * memory.GIB)


def test_serve_refuses_a_batch_that_cannot_fit_with_the_number_that_would(tiny_model_dir, data_dir):
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "serve", "--port", "0", "--model",
                           str(tiny_model_dir), "--device", "cpu", "--memory-budget-gib", "0.86", "--max-batch",
                           "4096", "--retrain-every", "0", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: memory plan: --max-batch 4096 does not fit on cpu:") and "use --max-batch" in last


def test_serve_and_retrain_refuse_before_loading_when_the_budget_is_too_small(tiny_model_dir, data_dir):
    for command in (["serve", "--port", "0"], ["retrain"]):
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), *command, "--model", str(tiny_model_dir),
                               "--device", "cpu", "--memory-budget-gib", "0.05", "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: memory plan: not enough memory on cpu:") and "GiB free" in last


def test_fsdp_plans_a_shard_of_the_policy_but_a_whole_copy_to_evaluate(qwen7b):
    ddp = memory.training_plan(qwen7b, "cuda:0", 2, processes=2)
    fsdp = memory.training_plan(qwen7b, "cuda:0", 2, processes=2, sharded=True)
    assert fsdp.name == "one retrain (PPO sharded over 2)"
    assert fsdp.parts["policy weights (1/2)"] == ddp.parts["policy weights"] / 2
    assert fsdp.total < ddp.total - 7 * memory.GIB  # 34.4 against 41.8 GiB
    # With more processes the whole copy the main process evaluates on is
    # what decides: sharding never plans less than two copies of the base.
    wide = memory.training_plan(qwen7b, "cuda:0", 2, processes=4, sharded=True)
    assert wide.name == "one retrain (evaluating the candidate whole)"
    assert wide.total >= ddp.parts["policy weights"] + ddp.parts["reward model weights"]
    assert wide.parts["evaluation logits"] > 2 * memory.GIB  # 64 replies x 33 positions x 152k vocabulary


def test_the_training_layout_comes_from_the_launcher_or_the_accelerate_config(tmp_path, monkeypatch):
    import app
    from tests.test_multiprocess import FSDP2_CONFIG

    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP2_CONFIG.format(version=2))

    def layout(*argv):
        return app.training_layout(app.build_parser().parse_args(["serve", *argv]))

    assert layout() == (1, False)
    assert layout("--train-launcher", "accelerate", "--train-processes", "4") == (4, False)
    assert layout("--train-launcher", "accelerate", "--accelerate-config", str(config)) == (2, True)
    with pytest.raises(app.CliError, match="cannot read the accelerate config"):
        layout("--train-launcher", "accelerate", "--accelerate-config", str(tmp_path / "missing.yaml"))
    monkeypatch.setenv("WORLD_SIZE", "3")  # inside `accelerate launch`
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert app.training_layout(app.build_parser().parse_args(["retrain"])) == (3, True)
