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
