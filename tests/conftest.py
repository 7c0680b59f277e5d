"""Shared fixtures. Nothing here touches the network: data paths go to a tmp
dir, the Hub is switched off, and models are tiny ones built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Set before transformers is imported anywhere, so that no test can reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(data_dir))
    monkeypatch.delenv("CHATBOT_MODEL", raising=False)
    return data_dir


@pytest.fixture
def data_dir(_isolated_data_dir):
    return _isolated_data_dir


@pytest.fixture
def store(data_dir):
    from storage import Store

    s = Store.in_data_dir(data_dir)
    yield s
    s.close()


TINY_STARTER = dict(
    vocab_size=320,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_length=64,
    steps=4,
    batch_size=8,
    warmup_steps=1,
    eval_prompts=16,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-style model and tokenizer, saved with save_pretrained."""
    from chatbot.starter import StarterConfig, corpus_pairs, make_model, train_tokenizer

    config = StarterConfig(**TINY_STARTER)
    pairs = corpus_pairs()[:200]
    tokenizer = train_tokenizer([t for p in pairs for t in p], config.vocab_size)
    model = make_model(tokenizer, config)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from chatbot.models import load_model

    return load_model(str(tiny_model_dir), tiny_model_dir)


@pytest.fixture
def chat_options():
    from chatbot.policy import GenerationSettings
    from chatbot.ui import ChatOptions

    return ChatOptions(defaults=GenerationSettings(max_new_tokens=12, temperature=1.0),
                       max_message_chars=500, max_new_tokens_limit=64)


@pytest.fixture
def server(tiny_loaded, store, chat_options):
    """The whole app (chat page and API) served on a free local port."""
    from chatbot.policy import Policy
    from chatbot.server import BackgroundServer, create_app

    app = create_app(Policy(tiny_loaded), store, chat_options)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """A tiny model trained for a few seconds on corpus pairs: unlike an
    untrained one, it writes word-like text whose style PPO can shift."""
    import random

    from chatbot.starter import StarterConfig, build_examples, corpus_pairs, make_model, train, train_tokenizer

    config = StarterConfig(**{**TINY_STARTER, "hidden_size": 64, "intermediate_size": 128, "steps": 200,
                              "batch_size": 16, "learning_rate": 1e-2, "neighbours": 0})
    pairs = corpus_pairs()[:200]
    tokenizer = train_tokenizer([t for p in pairs for t in p], config.vocab_size)
    model = make_model(tokenizer, config)
    train(model, build_examples(pairs, tokenizer, config, random.Random(0)), config, tokenizer.pad_token_id,
          lambda line: None)
    path = tmp_path_factory.mktemp("tiny-trained")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = ["hello", "how are you", "what is your name"]


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    """`prompt`'s greedy reply from transformers' own `generate`, alone: the
    reference the serving engine's replies are checked against."""
    import torch

    from chatbot.models import GenerationSettings
    from chatbot.prompt import encode
    from online_rl.sampling import WithinBase, adapted

    settings = GenerationSettings(temperature=0, max_new_tokens=max_new_tokens)
    config = settings.generation_config(tokenizer)
    ids = torch.tensor([encode(tokenizer, [{"role": "user", "content": prompt}])], device=model.device)
    # An adapter version writes within its base's words (`online_rl.sampling.WithinBase`).
    processors = [WithinBase(model, torch.ones_like(ids), settings)] if adapted(model) else []
    with torch.inference_mode():
        sequences = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                   logits_processor=processors)
    return tokenizer.decode(sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()


def make_adapter(base_dir, out: Path, seed: int, base_model: str) -> Path:
    """A LoRA whose random weights change the base's greedy replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    (out / "adapter.json").write_text(json.dumps({"version": out.name, "base_model": base_model}))
    return out


@pytest.fixture(scope="session")
def adapters(tiny_trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {v: make_adapter(tiny_trained, root / v, seed, str(tiny_trained)) for seed, v in ((1, "v1"), (2, "v2"))}


@pytest.fixture(scope="session")
def expected(tiny_trained, adapters):
    """Each version's greedy reply to each prompt, computed on separate copies
    of the model with transformers' own `generate`, one prompt at a time:
    neither the serving engine nor the hot-swap code is involved."""
    from peft import PeftModel

    from chatbot.models import load_model

    out = {}
    for version in ("v0", "v1", "v2"):
        loaded = load_model(str(tiny_trained), tiny_trained, device="cpu")
        model = loaded.model
        if version != "v0":
            model = PeftModel.from_pretrained(model, str(adapters[version])).eval()
        out[version] = {p: greedy_reply(model, loaded.tokenizer, p) for p in PROMPTS}
    assert out["v1"] != out["v0"] and out["v2"] != out["v1"], "the adapters must change the replies"
    return out
