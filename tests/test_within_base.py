"""An adapter version draws only words its base would serve at the same
place: the distribution (`GenerationSettings.served_probs`), the training
and evaluation sampler (`online_rl.sampling.WithinBase`) and the serving
engine (a shadow row on the base beside each adapted reply)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from chatbot.models import GenerationSettings  # noqa: E402
from online_rl.language import expected_nll  # noqa: E402
from online_rl.sampling import adapted, reply_logits, sample, token_logprobs  # noqa: E402

PROMPTS = [[{"role": "user", "content": p}] for p in ("hello", "how are you", "what is your name")]


def _version(model_dir, scale=0.3, seed=0):
    """The tiny base and a LoRA on it whose random weights change its replies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    version = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, param in version.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    return version, tokenizer


def _inside_base_nucleus(version, batch, settings) -> torch.Tensor:
    """For each reply token: whether the base's nucleus held it there."""
    with version.disable_adapter():
        base = reply_logits(version, batch)
    inside = settings.base_nucleus(base).gather(-1, batch["reply"].unsqueeze(-1)).squeeze(-1)
    return inside[batch["reply_mask"].bool()]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_base_serves_exactly_as_before(temperature):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 50) * 3
    settings = GenerationSettings(temperature=temperature, top_p=0.9)
    assert torch.allclose(settings.served_probs(logits, logits), settings.next_token_probs(logits), atol=1e-6)
    assert torch.equal(settings.served_probs(logits), settings.next_token_probs(logits))


def test_a_version_draws_inside_the_bases_nucleus_and_its_own():
    torch.manual_seed(1)
    base, version = torch.randn(200, 40) * 2, torch.randn(200, 40) * 2
    settings = GenerationSettings(temperature=0.8, top_p=0.9)
    served = settings.served_probs(version, base)
    assert torch.allclose(served.sum(-1), torch.ones(200))
    assert not (served > 0)[~settings.base_nucleus(base)].any()
    both = settings.base_nucleus(base) & (settings.next_token_probs(version) > 0)
    shared = both.any(-1)
    assert shared.any() and not shared.all()  # both cases below occur
    assert not (served[shared] > 0)[~both[shared]].any()
    # where the nuclei share no word, the version chooses among the base's
    assert torch.equal(served[~shared] > 0, settings.base_nucleus(base)[~shared])
    # within those words, the version's own odds at the serving temperature
    row = int(shared.nonzero()[0])
    kept = both[row]
    odds = torch.softmax(version[row][kept] / 0.8, -1)
    assert torch.allclose(served[row][kept], odds, atol=1e-6)
    # greedy: the version's best word among the base's (its nucleus at temperature 1)
    greedy = GenerationSettings(temperature=0, top_p=0.9)
    choice = greedy.served_probs(version, base).argmax(-1)
    allowed = greedy.base_nucleus(base)
    assert allowed.gather(-1, choice[:, None]).all()
    assert torch.equal(choice, version.masked_fill(~allowed, -math.inf).argmax(-1))
    # switched off, the version's own distribution
    free = GenerationSettings(temperature=0.8, top_p=0.9, within_base=False)
    assert torch.equal(free.served_probs(version, base), free.next_token_probs(version))


def test_sampled_replies_of_a_version_keep_to_the_bases_words(tiny_trained):
    version, tokenizer = _version(tiny_trained)
    assert adapted(version)
    with version.disable_adapter():
        assert not adapted(version)
    settings = GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    within = sample(version, tokenizer, PROMPTS * 20, settings)
    assert _inside_base_nucleus(version, within, settings).all()
    torch.manual_seed(0)
    free = sample(version, tokenizer, PROMPTS * 20,
                  GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, within_base=False))
    assert _inside_base_nucleus(version, free, settings).float().mean() < 0.95  # the restriction is what did it


def test_the_language_figure_is_taken_over_the_distribution_drawn_from(tiny_trained):
    """One-token replies of a version: the base's NLL of the tokens drawn
    averages to `expected_nll`, which takes it over `served_probs`."""
    # A version far enough from its base that the base's nucleus cuts off
    # much of what it would draw: at the LoRA scale of 0.3 the two
    # expectations differed by as little as 2 standard errors of the mean of
    # 3000 draws on one machine's tiny model, at 0.6 by more than 50.
    version, tokenizer = _version(tiny_trained, scale=0.6)
    settings = GenerationSettings(max_new_tokens=1, temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    batch = sample(version, tokenizer, PROMPTS[:1] * 3000, settings)
    with version.disable_adapter():
        base = reply_logits(version, batch)
    own = reply_logits(version, batch)
    drawn = -token_logprobs(base, batch).squeeze(-1)
    expected = expected_nll(own, base, batch, settings)[0].item()
    assert abs(drawn.mean().item() - expected) < 4 * drawn.std().item() / math.sqrt(len(drawn)) + 1e-4
    free = GenerationSettings(max_new_tokens=1, temperature=0.8, top_p=0.9, within_base=False)
    unrestricted = expected_nll(own, base, batch, free)[0].item()
    assert abs(drawn.mean().item() - unrestricted) > 4 * drawn.std().item() / math.sqrt(len(drawn))


def test_the_engine_serves_a_version_within_the_bases_words_and_frees_its_shadows(tiny_trained, adapters):
    """Sampled replies served concurrently on an adapter version: every token
    lies in the base's nucleus at its place, a shadow takes no reply's place
    in the batch, and every shadow leaves with its reply."""
    import threading
    import time

    from peft import PeftModel

    from chatbot.models import load_model
    from chatbot.policy import Policy
    from online_rl.sampling import left_pad

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"), max_batch=4, max_waiting=64)
    policy.swap_to("v1", str(adapters["v1"]))
    settings = GenerationSettings(max_new_tokens=10, temperature=0.8, top_p=0.9)
    requests, running = [], []

    def ask(i):
        prompt = policy.build_prompt(PROMPTS[i % 3], settings)
        request = policy._submit(prompt, settings, threading.Event())
        while request.events.get() is not None:
            running.append(policy.engine.running)
        requests.append(request)

    torch.manual_seed(0)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(requests) == 24 and {r.version for r in requests} == {"v1"}
    assert all(r.error is None and r.twin is not None and r.twin.shadow for r in requests)
    assert max(running) == 4  # four replies at once, each with its shadow beside it
    deadline = time.monotonic() + 5
    while policy.engine._rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert policy.engine._rows == []

    version = PeftModel.from_pretrained(load_model(str(tiny_trained), tiny_trained, device="cpu").model,
                                        str(adapters["v1"])).eval()
    prompt_ids, prompt_mask = left_pad([r.ids for r in requests], policy.tokenizer.pad_token_id, "cpu")
    width = max(len(r.tokens) for r in requests)
    reply = torch.tensor([r.tokens + [policy.tokenizer.pad_token_id] * (width - len(r.tokens)) for r in requests])
    reply_mask = torch.tensor([[1] * len(r.tokens) + [0] * (width - len(r.tokens)) for r in requests])
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "reply": reply, "reply_mask": reply_mask}
    assert reply_mask.sum() > 48
    assert _inside_base_nucleus(version, batch, settings).all()


def test_no_within_base_reaches_serving_and_the_scheduled_retrain(data_dir):
    import app

    parse = app.build_parser().parse_args
    _, options = app.serve_settings(parse(["serve"]))
    assert options.defaults.within_base is True
    _, options = app.serve_settings(parse(["serve", "--no-within-base"]))
    assert options.defaults.within_base is False
    command = app.retrain_command(parse(["serve", "--data-dir", str(data_dir), "--no-within-base"]))("tilt", 1)
    assert command[command.index("retrain"):].count("--no-within-base") == 1
    assert "--no-within-base" not in app.retrain_command(parse(["serve", "--data-dir", str(data_dir)]))("tilt", 1)
    retrain = parse(["retrain", "--data-dir", str(data_dir), "--no-within-base"])
    assert retrain.no_within_base is True
