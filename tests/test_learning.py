"""The learning stages on a tiny model: data snapshot, reward model, PPO, KTO."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from online_rl.data import DataConfig, Example, Snapshot, is_heldout, snapshot  # noqa: E402


def _chat(store, prompt, replies_and_votes, session="s1", user=None):
    conversation = store.start_conversation(session, user)
    messages = [{"role": "user", "content": prompt}]
    ids = []
    for reply, vote in replies_and_votes:
        rid = store.log_response(conversation_id=conversation, prompt=messages, reply=reply, model_version="v0",
                                 session_id=session, user=user)
        if vote:
            store.record_feedback(rid, vote, session_id=session, user=user)
        ids.append(rid)
    return conversation, ids


# -- data -----------------------------------------------------------------------


def test_snapshot_splits_by_conversation_pairs_regenerates_and_respects_the_watermark(store):
    for i in range(40):
        _chat(store, f"question {i}", [(f"short {i}", 1), (f"a much longer answer {i}", -1)])
    watermark = store.latest_feedback_id()
    _chat(store, "later", [("after the watermark", 1)])
    snap = snapshot(store, DataConfig(heldout_fraction=0.3), watermark)
    assert snap.watermark == watermark
    assert len(snap.examples) == 80
    assert all(e.reply != "after the watermark" for e in snap.examples)
    train_convs = {e.conversation_id for e in snap.train}
    held_convs = {e.conversation_id for e in snap.heldout}
    assert train_convs and held_convs and not train_convs & held_convs
    # Regenerate gave one liked and one disliked reply per turn: one pair each.
    assert len(snap.train_pairs) + len(snap.heldout_pairs) == 40
    pair = snap.train_pairs[0]
    assert pair.chosen.startswith("short") and pair.rejected.startswith("a much longer")
    # The prompt pool holds every prompt, rated or not, on its conversation's side.
    assert len(snap.prompts) + len(snap.heldout_prompts) == 41
    assert all(is_heldout(c, 0.3) for c in held_convs)


def test_one_rater_cannot_dominate(store):
    for i in range(30):
        _chat(store, f"q{i}", [(f"r{i}", 1)], session="loud")
    for i in range(5):
        _chat(store, f"p{i}", [(f"s{i}", -1)], session="quiet")
    snap = snapshot(store, DataConfig(per_rater_cap=10, heldout_fraction=0.0))
    raters = [e.rater for e in snap.examples]
    assert raters.count("session:loud") == 10 and raters.count("session:quiet") == 5
    assert snap.capped == 20
    # The most recent ones are kept.
    assert {e.reply for e in snap.examples if e.rater == "session:loud"} == {f"r{i}" for i in range(20, 30)}


def test_a_changed_mind_counts_once_with_the_latest_vote(store):
    _, (rid,) = _chat(store, "hi", [("hello", 1)])
    store.record_feedback(rid, -1, session_id="s1")
    snap = snapshot(store, DataConfig(heldout_fraction=0.0))
    assert [(e.reply, e.label) for e in snap.examples] == [("hello", False)]


# -- reward model -----------------------------------------------------------------


def test_auc():
    from online_rl.reward import auc

    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.1, 0.2], [True, True]) is None


def _synthetic_snapshot(n=160):
    """Liked replies say yes, disliked ones say no: separable by their words."""
    snap = Snapshot(watermark=n)
    for i in range(n):
        liked = i % 2 == 0
        reply = ("yes sure, glad to" if liked else "no, go away now") + f" {i % 7}"
        example = Example([{"role": "user", "content": f"can you help with {i}?"}], reply, liked,
                          f"conv-{i}", "s", f"r{i}", i)
        (snap.heldout if i % 5 == 0 else snap.train).append(example)
    return snap


def test_reward_model_learns_a_separable_preference(tiny_loaded):
    from online_rl.reward import RewardConfig, train_reward_model

    snap = _synthetic_snapshot()
    rm, metrics = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap,
                                     RewardConfig(epochs=8, lr=5e-3, batch_size=16), device=torch.device("cpu"),
                                     progress=lambda line: None)
    assert metrics["heldout_examples"] == 32
    assert metrics["auc"] >= 0.95 and metrics["accuracy"] >= 0.85
    up, down = rm.score([[{"role": "user", "content": "help?"}]] * 2, ["yes sure, glad to 3", "no, go away now 3"])
    assert up > down


def test_reward_model_continues_from_its_previous_version(tiny_loaded, tmp_path):
    from online_rl.reward import RewardConfig, load_reward_model, train_reward_model

    snap = _synthetic_snapshot(60)
    cfg = RewardConfig(epochs=2, lr=5e-3)
    cpu = torch.device("cpu")
    rm, _ = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap, cfg, device=cpu,
                               progress=lambda line: None)
    rm.save(tmp_path / "rm1")
    saved = load_reward_model(tiny_loaded.path, tmp_path / "rm1", tiny_loaded.tokenizer, cpu)
    prompts, replies = [e.prompt for e in snap.train[:4]], [e.reply for e in snap.train[:4]]
    assert saved.score(prompts, replies) == pytest.approx(rm.score(prompts, replies), abs=1e-5)
    _, metrics = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap, cfg, device=cpu,
                                    previous=tmp_path / "rm1", progress=lambda line: None)
    assert metrics["continued_from"] == str(tmp_path / "rm1")


# -- PPO ----------------------------------------------------------------------------


def test_gae_matches_a_hand_computation():
    from online_rl.ppo import gae

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: 0 + .5 - .5 = 0, 0 + .5 - .5 = 0, 1 + 0 - .5 = .5 (the padded step is not a next state)
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0, 0.0])


def test_adaptive_kl_moves_toward_its_target():
    from online_rl.ppo import AdaptiveKL

    kl = AdaptiveKL(0.1, target=2.0, horizon=100)
    kl.update(10.0, n=10)
    assert kl.value == pytest.approx(0.1 * 1.02)
    kl.update(0.0, n=10)
    assert kl.value < 0.1 * 1.02


def _fresh_policy(tiny_model_dir, config):
    from transformers import AutoModelForCausalLM

    from online_rl.ppo import add_lora

    torch.manual_seed(0)
    return add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), config)


PROMPTS = [[{"role": "user", "content": p}] for p in ("hello", "how are you", "what is AI", "tell me a joke",
                                                      "good morning", "who are you", "bye", "thanks")]


def starts_with_i(prompts, replies):
    """A scripted reward: 1 for a reply that starts with "I" (a quarter of the
    tiny model's replies at first)."""
    return [1.0 if r.startswith("I") else 0.0 for r in replies]


def _ppo(tiny_trained, **overrides):
    from chatbot.models import load_tokenizer
    from online_rl.ppo import PPOConfig, PPOTrainer

    settings = dict(steps=10, rollouts=16, minibatch=8, epochs=2, lr=3e-3, max_new_tokens=8,
                    init_kl_coef=0.01, adaptive_kl=False, missing_eos_penalty=0.0, seed=0)
    config = PPOConfig(**{**settings, **overrides})
    policy = _fresh_policy(tiny_trained, config)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = PPOTrainer(policy, load_tokenizer(str(tiny_trained)), config, progress=lambda line: None)
    value_before = trainer.unwrapped.value_head.weight.detach().clone()
    history = trainer.train(PROMPTS, starts_with_i)
    return trainer, history, before, value_before


def test_ppo_raises_the_reward_and_moves_only_lora_and_value_head(tiny_trained):
    trainer, history, before, value_before = _ppo(tiny_trained)
    first = sum(h["reward"] for h in history[:2]) / 2
    last = sum(h["reward"] for h in history[-2:]) / 2
    assert last > first + 0.3, [h["reward"] for h in history]
    for key in ("reward", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "kl_coef"):
        assert key in history[-1]
    moved_lora = moved_base = 0
    for name, param in trainer.unwrapped.policy.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if "lora_" in name:
            moved_lora += changed
        else:
            moved_base += changed
    assert moved_lora > 0 and moved_base == 0
    assert not torch.equal(trainer.unwrapped.value_head.weight, value_before)


def test_a_large_kl_coefficient_keeps_the_policy_near_the_reference(tiny_trained):
    _, loose, _, _ = _ppo(tiny_trained, steps=8)
    _, tight, _, _ = _ppo(tiny_trained, steps=8, init_kl_coef=5.0)
    loose_kl = sum(h["kl"] for h in loose[-3:]) / 3
    tight_kl = sum(h["kl"] for h in tight[-3:]) / 3
    assert tight_kl < 0.5 * loose_kl, (tight_kl, loose_kl)
    assert tight_kl < 1.0


def test_replies_cut_off_without_an_end_token_are_penalised(tiny_trained):
    # Three tokens are too few for most replies to end.
    _, history, _, _ = _ppo(tiny_trained, steps=1, max_new_tokens=3, missing_eos_penalty=2.0, lr=1e-6)
    record = history[0]
    assert record["eos_fraction"] < 0.5
    assert record["score"] == pytest.approx(record["reward"] - 2.0 * (1 - record["eos_fraction"]), abs=1e-4)


# -- KTO ----------------------------------------------------------------------------


def test_kto_weights_balance_the_classes():
    from online_rl.kto import class_weights

    assert class_weights(30, 10) == (1.0, 3.0)
    assert class_weights(10, 40) == (4.0, 1.0)
    assert class_weights(0, 5) == (1.0, 1.0)


def test_kto_trains_a_lora_adapter_for_a_few_steps(tiny_model_dir, tiny_loaded):
    from transformers import AutoModelForCausalLM

    from online_rl.kto import KTOSettings, train_kto

    snap = _synthetic_snapshot(24)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    lines = []
    model, metrics = train_kto(base, tiny_loaded.tokenizer, snap.examples, KTOSettings(batch_size=4, max_steps=3,
                                                                                          lr=1e-2),
                               progress=lines.append, device="cpu")
    assert metrics["steps"] == 3 and metrics["batch_size"] == 4
    assert metrics["desirable_weight"] == 1.0 and metrics["undesirable_weight"] == 1.0
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # B starts at zero: it moved
    assert any(line.startswith("kto: step") for line in lines)
