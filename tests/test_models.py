import pytest
import torch

from chatbot.models import (
    PLAIN_CHAT_TEMPLATE,
    ModelLoadError,
    ensure_chat_template,
    load_model,
    resolve_device,
)


def test_loads_a_local_model_on_the_cpu_in_float32(tiny_model_dir, data_dir):
    loaded = load_model(str(tiny_model_dir), data_dir)
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>Hi<|end|><|assistant|>"
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_a_tokenizer_without_a_template_gets_the_plain_one(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.pad_token = None
    ensure_chat_template(tok)
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE
    assert tok.pad_token == tok.eos_token
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "Be kind.\n\nUser: Hi\nAssistant:"


def test_missing_local_path_is_one_line_naming_it(tmp_path, data_dir):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing), data_dir)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "does not exist" in message


def test_unreachable_hub_id_is_one_line_naming_what_was_tried(data_dir):
    # The Hub is off in tests (HF_HUB_OFFLINE=1), as it is on a machine with no network.
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model-that-is-not-cached", data_dir)
    message = str(info.value)
    assert "\n" not in message
    assert "Hugging Face Hub id 'some-org/some-model-that-is-not-cached'" in message


def test_a_directory_that_is_not_a_model_is_refused_clearly(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model(str(tmp_path / "empty"), data_dir)


def test_device_resolution_on_the_cpu():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu-please")


def test_dtype_follows_the_device(monkeypatch):
    from chatbot.models import default_dtype

    assert default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype(torch.device("cuda:0")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype(torch.device("cuda:1")) == torch.float16


def test_quantized_loading_explains_what_is_missing(tiny_model_dir, data_dir, monkeypatch):
    import builtins

    from chatbot.models import quantization_config

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ModelLoadError, match=r"needs the bitsandbytes package.*\.\[quantize\]"):
        load_model(str(tiny_model_dir), data_dir, device="cpu", quantize="4bit")
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert quantization_config("none", torch.device("cpu")) is None
    with pytest.raises(ModelLoadError, match="unknown --quantize"):
        quantization_config("3bit", torch.device("cpu"))


def test_serve_on_a_missing_gpu_is_one_clear_line(data_dir):
    import subprocess
    import sys
    from pathlib import Path

    import os

    app = Path(__file__).resolve().parents[1] / "app.py"
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU-only machine, wherever this runs
    done = subprocess.run([sys.executable, str(app), "serve", "--device", "cuda:0", "--port", "0",
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120,
                          env=no_gpu)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: device 'cuda:0' asked for, but no CUDA GPU is visible"


def test_a_checkpoints_own_generation_config_does_not_change_what_is_served(tiny_model_dir):
    """Serving and rollouts sample through one GenerationConfig with every
    sampling field set: a checkpoint's generation_config.json (here a huge
    repetition penalty, top-k 1, a 2-token cap, min-p) changes nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.sampling import sample

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.padding_side = "left"
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    odd = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    odd.generation_config.update(repetition_penalty=50.0, top_k=1, max_new_tokens=2, min_p=0.9,
                                 no_repeat_ngram_size=1)
    prompts = [[{"role": "user", "content": p}] for p in ("hello", "how are you", "what is AI")]
    for settings in (GenerationSettings(max_new_tokens=12, temperature=0), GenerationSettings(max_new_tokens=12)):
        torch.manual_seed(0)
        a = sample(plain, tokenizer, prompts, settings)
        torch.manual_seed(0)
        b = sample(odd, tokenizer, prompts, settings)
        assert a["texts"] == b["texts"] and torch.equal(a["reply"], b["reply"])
        assert a["reply"].shape[1] > 2  # the 2-token cap of the checkpoint did not apply
