"""The serving layout of the weights (`chatbot.layout`): the same model, the
same outputs, no second copy, tied weights still tied."""

from __future__ import annotations


def test_weights_laid_out_in_out_give_the_same_logits_without_a_second_copy(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.layout import transpose_for_decoding

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()  # the output layer shares the embedding, as many chat models do
    reference.config.tie_word_embeddings = True
    reference.tie_weights()
    count = sum(p.numel() for p in model.parameters())
    changed = transpose_for_decoding(model)

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert changed == len({id(m.weight) for m in linears}) > 0
    assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still one tensor
    assert sum(p.numel() for p in model.parameters()) == count  # nothing copied
    ids = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert transpose_for_decoding(model) == 0  # laid out once: a second call changes nothing
