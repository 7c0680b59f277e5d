"""A batch with each row on its own adapter, without peft's split of the batch
(`chatbot.lora_rows`): the same logits as peft's ``adapter_names=`` path and
as each row on its own, and nothing left changed afterwards."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    """The tiny model with two LoRA adapters of different ranks and weights
    (B non-zero, so that each changes the logits)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.set_adapter("a")
    return model.eval()


def _logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_each_row_gets_its_own_adapter_as_peft_gives_it(two_adapters):
    from chatbot.lora_rows import BASE_ROW, lora_layers, rows_on_adapters, supported

    model = two_adapters
    names = ["a", "b", BASE_ROW, "b", "a"]
    ids = torch.randint(3, model.config.vocab_size, (len(names), 6), generator=torch.Generator().manual_seed(1))
    layers = lora_layers(model)
    assert layers and supported(layers, {"a", "b"})
    with rows_on_adapters(layers, names):
        ours = _logits(model, ids)
    peft_path = _logits(model, ids, adapter_names=names)
    torch.testing.assert_close(ours, peft_path, rtol=1e-5, atol=1e-5)
    # Row by row, alone: the adapter of its name, or the base.
    for row, name in enumerate(names):
        if name == BASE_ROW:
            with model.disable_adapter():
                alone = _logits(model, ids[row:row + 1])
        else:
            model.set_adapter(name)
            alone = _logits(model, ids[row:row + 1])
        torch.testing.assert_close(ours[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    model.set_adapter("a")
    # The adapters really differ: on "a" (the active one) row 1 gets other logits than on "b".
    assert not torch.allclose(ours[1], _logits(model, ids[1:2])[0], atol=1e-3)


def test_nothing_is_left_changed_even_on_error(two_adapters):
    from chatbot.lora_rows import lora_layers, rows_on_adapters

    model = two_adapters
    layers = lora_layers(model)
    before = [(layer.active_adapters, dict(layer.scaling)) for layer in layers]
    with pytest.raises(RuntimeError, match="mid-pass"):
        with rows_on_adapters(layers, ["b", "a"]):
            assert any(isinstance(s, torch.Tensor) for layer in layers for s in layer.scaling.values())
            raise RuntimeError("mid-pass")
    assert [(layer.active_adapters, dict(layer.scaling)) for layer in layers] == before
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, ids), _logits(model, ids, adapter_names=["a", "a"]))


def test_dora_is_left_to_peft(tiny_model_dir):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from chatbot.lora_rows import lora_layers, supported

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="d")
    assert not supported(lora_layers(model), {"d"})
