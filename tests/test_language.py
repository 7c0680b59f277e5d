"""The language figures: the base's NLL per token, expected over the
distribution each token was drawn from."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from chatbot.models import GenerationSettings  # noqa: E402
from online_rl.language import (base_nll_per_token, drawn_excess, drift, expected_nll, outside_cost,  # noqa: E402
                                 reply_excess)
from online_rl.sampling import reply_logits, row_chunks, sample, token_logprobs  # noqa: E402


def _one_token_replies(model_dir, settings, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    batch = sample(model, tokenizer, [[{"role": "user", "content": "how are you"}]] * n, settings)
    return model, batch


@pytest.mark.parametrize("temperature,top_p", [(0.8, 0.95), (0.5, 0.6), (1.0, 1.0)])
def test_the_expected_nll_is_the_mean_nll_of_the_tokens_generate_draws(tiny_trained, temperature, top_p):
    settings = GenerationSettings(max_new_tokens=1, temperature=temperature, top_p=top_p)
    model, batch = _one_token_replies(tiny_trained, settings, 3000)
    logits = reply_logits(model, batch)
    drawn = (-token_logprobs(logits, batch)).squeeze(-1)
    expected = expected_nll(logits, logits, batch, settings)
    assert torch.allclose(expected, expected[0])  # one context, one expectation
    # the draws' mean lands on the expectation, within four standard errors
    assert abs(drawn.mean().item() - expected[0].item()) < 4 * drawn.std().item() / math.sqrt(len(drawn)) + 1e-4
    # and the nucleus matters: an expectation over the whole distribution misses when the nucleus cuts
    whole = expected_nll(logits, logits, batch, GenerationSettings(temperature=temperature, top_p=1.0))[0].item()
    if top_p < 1.0:
        assert abs(drawn.mean().item() - whole) > 4 * drawn.std().item() / math.sqrt(len(drawn))


def test_greedy_replies_count_the_token_they_chose(tiny_trained):
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0)
    model, batch = _one_token_replies(tiny_trained, settings, 2)
    logits = reply_logits(model, batch)
    drawn = -token_logprobs(logits, batch).sum(-1) / batch["reply_mask"].sum(-1)
    assert torch.allclose(expected_nll(logits, logits, batch, settings), drawn, atol=1e-5)


def test_a_peft_versions_figure_is_taken_against_its_base(tiny_trained):
    from peft import LoraConfig, get_peft_model

    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0)
    base, batch = _one_token_replies(tiny_trained, settings, 8)
    alone = base_nll_per_token(base, [batch], settings)
    version = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in version.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert base_nll_per_token(version, [batch], settings, base_wrote=True) == pytest.approx(alone, abs=1e-4)
    assert base_nll_per_token(version, [batch], settings) != pytest.approx(alone, abs=1e-3)


def test_the_excess_is_zero_for_the_bases_own_replies_whatever_their_length(tiny_trained):
    # Replies cut at 2 tokens and at 12: the plain NLL per token differs with
    # the positions (the first tokens are the uncertain ones), the expected
    # excess of the base's own replies is 0 at every position.
    figures = {}
    for length in (2, 12):
        settings = GenerationSettings(max_new_tokens=length, temperature=0.8, top_p=0.95)
        model, batch = _one_token_replies(tiny_trained, settings, 64)
        figures[length] = drift(model, [batch], settings, base_wrote=True)
        assert figures[length]["excess_nll"] == pytest.approx(0.0, abs=1e-4)
    assert abs(figures[2]["base_nll"] - figures[12]["base_nll"]) > 0.05


def test_the_drawn_excess_averages_to_zero_on_the_bases_samples_and_rises_for_unlikely_tokens(tiny_trained):
    settings = GenerationSettings(max_new_tokens=1, temperature=0.8, top_p=0.95)
    model, batch = _one_token_replies(tiny_trained, settings, 3000)
    drawn = reply_excess(model, [batch], settings)
    assert abs(drawn.mean().item()) < 4 * drawn.std().item() / math.sqrt(len(drawn)) + 1e-4
    # The same positions with the base's least likely token in place of each draw.
    logits = reply_logits(model, batch)
    worst = logits.argmin(-1)
    unlikely = drawn_excess(logits, worst, batch["reply_mask"], settings)
    assert (unlikely > drawn.max() + 1.0).all()


def test_a_large_vocabulary_is_scored_in_pieces_of_whole_rows():
    batch = {"reply": torch.zeros(10, 7, dtype=torch.long), "texts": list("abcdefghij")}
    pieces = list(row_chunks(batch, vocabulary=1000, max_numbers=7 * 1000 * 3))
    assert [len(p["texts"]) for p in pieces] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([p["reply"] for p in pieces]), batch["reply"])
    assert [len(p["texts"]) for p in row_chunks(batch, vocabulary=10**9)] == [1] * 10


def test_the_outside_cost_counts_only_words_the_base_would_never_serve():
    settings = GenerationSettings(temperature=0.8, top_p=0.95)
    torch.manual_seed(0)
    base = torch.randn(4, 6, 50) * 3
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    assert outside_cost(base, base, mask, settings).item() == 0.0
    # Sharper than the base (its nucleus inside the base's) costs nothing either.
    assert outside_cost(base * 3, base, mask, settings).item() == 0.0
    # Mass on the base's least likely token costs its NLL, and the gradient lowers it.
    worst = base.argmin(-1, keepdim=True)
    version = base.scatter(-1, worst, base.amax(-1, keepdim=True)).requires_grad_(True)
    cost = outside_cost(version, base, mask, settings)
    worst_nll = -torch.log_softmax(base, -1).gather(-1, worst).squeeze(-1)
    assert 0.1 * float(worst_nll.min()) < cost.item() < float(worst_nll.max())
    cost.backward()
    assert (version.grad.gather(-1, worst).squeeze(-1)[mask.bool()] > 0).all()
