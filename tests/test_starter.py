import json

import pytest

from chatbot import starter
from chatbot.models import load_model
from chatbot.starter import StarterConfig, ensure_starter, is_built, starter_dir
from tests.conftest import TINY_STARTER


def tiny(**overrides):
    return StarterConfig(**{**TINY_STARTER, **overrides})


def test_corpus_pairs_come_from_the_installed_package():
    pairs = starter.corpus_pairs()
    assert len(pairs) > 2000
    replies = starter.corpus_replies()
    assert "Good." in replies["How are you doing?"]


def test_builds_once_then_reuses(data_dir):
    messages = []
    path = ensure_starter(data_dir, config=tiny(), progress=messages.append)
    assert path == starter_dir(data_dir) and is_built(path)
    assert any("step 4/4" in m for m in messages)  # progress is shown
    info = json.loads((path / "starter.json").read_text())
    assert info["config"]["hidden_size"] == TINY_STARTER["hidden_size"]
    assert 0.0 <= info["greedy_match_rate"] <= 1.0

    again = []
    assert ensure_starter(data_dir, config=tiny(), progress=again.append) == path
    assert again == []  # nothing rebuilt

    loaded = load_model("starter", data_dir)
    assert loaded.path == str(path)
    assert loaded.tokenizer.eos_token == "<|end|>"


def test_training_lowers_the_loss():
    pairs = starter.corpus_pairs()[:64]
    config = tiny(steps=30, batch_size=16, learning_rate=1e-2, warmup_steps=3)
    tokenizer = starter.train_tokenizer([t for p in pairs for t in p], config.vocab_size)
    import random

    examples = starter.build_examples(pairs, tokenizer, config, random.Random(0))
    model = starter.make_model(tokenizer, config)
    losses = starter.train(model, examples, config, tokenizer.pad_token_id, lambda _: None)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_training_examples_train_on_the_reply_only():
    config = tiny()
    tokenizer = starter.train_tokenizer(["Hello there", "Hi! How are you?"], config.vocab_size)
    ids, labels = starter._encode_example(tokenizer, [{"role": "user", "content": "Hello there"}],
                                          "Hi!", config.max_length)
    assert len(ids) == len(labels)
    trained = [t for t in labels if t != -100]
    assert tokenizer.decode(trained) == "Hi!<|end|>"
    assert tokenizer.decode(ids) == "<|user|>Hello there<|end|><|assistant|>Hi!<|end|>"


def test_an_interrupted_build_is_never_used(data_dir, monkeypatch):
    real_train = starter.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(starter, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_starter(data_dir, config=tiny(), progress=lambda _: None)
    assert not is_built(starter_dir(data_dir))

    # A crash while saving leaves only a scratch directory behind.
    monkeypatch.setattr(starter, "train", real_train)

    def disk_full(scratch, out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(starter, "_publish", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ensure_starter(data_dir, config=tiny(), progress=lambda _: None)
    assert not is_built(starter_dir(data_dir))
    assert not starter_dir(data_dir).exists()
    assert list(starter_dir(data_dir).parent.glob("starter.partial-*"))

    monkeypatch.undo()
    path = ensure_starter(data_dir, config=tiny(), progress=lambda _: None)
    assert is_built(path)
    assert not list(path.parent.glob("starter.partial-*"))  # leftovers cleaned up


def test_similar_prompts_are_the_ones_sharing_rare_words():
    prompts = ["what is a computer", "do you like football", "is a computer smart",
               "who won the football match", "what time is it"]
    near = starter.similar_prompts(prompts, 1)
    assert near[0] == [2] and near[1] == [3] and near[3] == [1]
    assert all(i not in row for i, row in enumerate(starter.similar_prompts(prompts, 4)))


def test_each_prompt_also_trains_on_what_the_corpus_says_to_similar_prompts():
    pairs = [("what is a computer", "A machine that computes."), ("tell me about a computer", "They run programs."),
             ("do you like football", "I love the game."), ("who plays football", "Teams of eleven.")]
    config = tiny(neighbours=1, own_share=0.5, context_fraction=0.0)
    tokenizer = starter.train_tokenizer([t for p in pairs for t in p], config.vocab_size)
    import random

    groups = starter.build_examples(pairs, tokenizer, config, random.Random(0))
    own, others = groups[0]
    decode = lambda examples: [tokenizer.decode([t for t in labels if t != -100]) for _, labels in examples]
    assert decode(own) == ["A machine that computes.<|end|>"]
    assert decode(others) == ["They run programs.<|end|>"]
    rng = random.Random(0)
    draws = [starter._draw(groups[0], 0.5, rng) for _ in range(400)]
    share_own = sum(d is own[0] for d in draws) / len(draws)
    assert 0.4 < share_own < 0.6
