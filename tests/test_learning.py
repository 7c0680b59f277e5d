"""The learning stages on a tiny model: data snapshot, reward model, PPO, KTO."""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")

from online_rl.data import DataConfig, Example, Snapshot, is_heldout, snapshot  # noqa: E402
from storage.common import prompt_hash  # noqa: E402


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
    assert all(is_heldout(c, 0.3) for c in held_convs)
    # The prompt pool holds every prompt, rated or not, on its own side: split
    # by the prompt, so no update samples from a prompt the gate judges on.
    assert len(snap.prompts) + len(snap.heldout_prompts) == 41
    assert snap.heldout_prompts and snap.prompts
    assert all(is_heldout(prompt_hash(p), 0.3) for p in snap.heldout_prompts)
    assert not any(is_heldout(prompt_hash(p), 0.3) for p in snap.prompts)


def test_a_prompt_sent_in_many_conversations_stays_on_one_side(store):
    for i in range(30):
        _chat(store, "hello there", [(f"reply {i}", 1 if i % 2 else -1)], session=f"s{i}")
    snap = snapshot(store, DataConfig(heldout_fraction=0.5))
    assert snap.train and snap.heldout  # its thumbs are split by conversation ...
    assert len(snap.prompts) + len(snap.heldout_prompts) == 1  # ... the prompt is on one side only


def test_one_rater_cannot_dominate(store):
    for i in range(30):
        _chat(store, f"q{i}", [(f"r{i}", 1)], session="loud")
    for i in range(5):
        _chat(store, f"p{i}", [(f"s{i}", -1)], session="quiet")
    snap = snapshot(store, DataConfig(heldout_fraction=0.0))
    # Every thumb is kept; two raters hold half the weight each.
    raters = [e.rater for e in snap.examples]
    assert raters.count("session:loud") == 30 and raters.count("session:quiet") == 5
    weight = {r: sum(e.weight for e in snap.train if e.rater == r) for r in set(raters)}
    assert weight["session:loud"] == pytest.approx(weight["session:quiet"])
    assert all(e.weight > 0 for e in snap.train)
    # The prompts PPO draws are weighted by the same rule.
    loud = sum(w for who, w in zip(snap.prompt_raters, snap.prompt_weights) if who == ("session:loud",))
    assert loud == pytest.approx(sum(snap.prompt_weights) / 2)
    # What the run records: the top raters, before and after the bound.
    shares = snap.rater_shares()
    assert shares["thumbs"]["top"][0] == {"rater": "session:loud", "rows": 30, "share_before": 0.8571,
                                          "share_after": 0.5}
    assert shares["prompts"]["top"][0]["share_before"] == 0.8571
    # With the bound off every row weighs the same.
    off = snapshot(store, DataConfig(heldout_fraction=0.0, max_rater_share=1.0))
    assert {e.weight for e in off.train} == {1.0} and set(off.prompt_weights) == {1.0}
    with pytest.raises(ValueError, match="max_rater_share"):
        snapshot(store, DataConfig(max_rater_share=0.0))


def test_the_liked_replies_of_the_anchor_are_weighted_by_their_raters(store):
    for i in range(12):
        _chat(store, f"q{i}", [(f"liked {i}", 1)], session="loud")
    for i in range(3):
        _chat(store, f"p{i}", [(f"also liked {i}", 1), (f"disliked {i}", -1)], session="quiet")
    snap = snapshot(store, DataConfig(heldout_fraction=0.0))
    anchor, weights = snap.liked()
    assert len(anchor) == 15 and all(w > 0 for w in weights)
    quiet = sum(w for (_, reply), w in zip(anchor, weights) if reply.startswith("also"))
    assert quiet == pytest.approx(sum(weights) / 2)
    # A pair made of two raters' thumbs counts half for each.
    _chat(store, "q0", [("another", -1)], session="quiet")
    shared = [p for p in snapshot(store, DataConfig(heldout_fraction=0.0)).train_pairs if p.chosen == "liked 0"]
    assert [p.raters for p in shared] == [("session:loud", "session:quiet")]


def test_one_rater_sending_many_prompts_cannot_push_the_others_out_of_the_pool(store):
    for i in range(3):
        _chat(store, f"mine {i}", [("ok", 0)], session="quiet")
    for i in range(50):
        _chat(store, f"flood {i}", [("ok", 0)], session="loud")
    pool = store.user_prompts(limit=10)
    texts = [item["prompt"][0]["content"] for item in pool]
    assert len(texts) == 10 and {"mine 0", "mine 1", "mine 2"} <= set(texts)
    assert texts[:2] == ["flood 49", "mine 2"]  # each rater's newest first, then each one's second newest
    assert pool[texts.index("mine 0")]["raters"] == [{"user": None, "session_id": "quiet"}]


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


def test_weighted_auc_counts_a_row_of_weight_two_as_two_rows():
    import random

    from online_rl.reward import auc

    rng = random.Random(3)
    for _ in range(50):
        n = rng.randrange(2, 12)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        counts = [rng.randrange(1, 4) for _ in range(n)]
        repeated = [(s, y) for s, y, c in zip(scores, labels, counts) for _ in range(c)]
        assert auc(scores, labels, [float(c) for c in counts]) == \
            auc([s for s, _ in repeated], [y for _, y in repeated])


def test_a_loud_contrarian_does_not_hold_the_reward_models_auc_at_chance():
    """Twenty raters like long replies; one rater with as many thumbs as all
    of them likes short ones. Under the rater bound's weights the held-out
    AUC of a reward model that learned the majority's taste stays high."""
    from online_rl.influence import rater_weights
    from online_rl.reward import auc

    rows = [(f"quiet{i}", length, length > 5) for i in range(20) for length in (2, 8)]
    rows += [("loud", length, length <= 5) for length in (2, 8) for _ in range(20)]
    scores = [float(length) for _, length, _ in rows]  # prefers long replies, as the majority does
    labels = [liked for _, _, liked in rows]
    assert auc(scores, labels) == 0.5
    weights = rater_weights([rater for rater, _, _ in rows], 0.05)
    assert auc(scores, labels, weights) > 0.85


def test_auc_interval_and_calibration():
    from online_rl.reward import auc_interval, calibration

    low, high = auc_interval(0.6, 9, 9)
    assert low < 0.5 < high  # 18 thumbs cannot tell 0.6 from chance
    low, high = auc_interval(0.6, 200, 200)
    assert 0.5 < low < 0.6 < high
    assert auc_interval(0.9, 0, 5) is None
    assert calibration([10.0, -10.0], [True, False])["brier"] < 0.01
    assert calibration([10.0, -10.0], [False, True])["ece"] > 0.99


def test_reward_model_training_stops_on_held_out_loss_and_keeps_its_best_epoch(tiny_loaded):
    from online_rl.reward import RewardConfig, train_reward_model

    snap = _synthetic_snapshot(80)
    # Held-out thumbs that say the opposite: every epoch of training makes their loss worse.
    flipped = [Example(e.prompt, e.reply, not e.label, e.conversation_id, e.rater, e.response_id, e.feedback_id)
               for e in snap.heldout]
    rm, metrics = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap.train, [], flipped, [],
                                     RewardConfig(epochs=10, patience=2, lr=5e-3), device=torch.device("cpu"),
                                     progress=lambda line: None)
    assert metrics["best_epoch"] == 0 and metrics["epochs_run"] == 2
    assert metrics["auc"] <= 0.6  # the untrained start kept, not the overfitted epochs


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
    rm, metrics = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap.train, [], snap.heldout, [],
                                     RewardConfig(epochs=8, lr=5e-3, batch_size=16), device=torch.device("cpu"),
                                     progress=lambda line: None)
    assert metrics["heldout_examples"] == 32
    assert metrics["auc"] >= 0.95 and metrics["accuracy"] >= 0.85
    assert metrics["auc_low"] > 0.5 and metrics["brier"] is not None and metrics["ece"] is not None
    up, down = rm.score([[{"role": "user", "content": "help?"}]] * 2, ["yes sure, glad to 3", "no, go away now 3"])
    assert up > down


def test_the_reward_models_loss_weights_thumbs_and_pairs_by_rater():
    """The held-out loss, computed by hand: BCE weighted by class and by the
    rater bound, plus the pair term weighted by the pairs' weights."""
    import math

    from online_rl.data import Pair
    from online_rl.reward import RewardConfig, class_weights, validation_loss

    class Fixed:
        def score(self, prompts, replies):
            return [{"good": 2.0, "bad": -1.0, "meh": 0.5}[r] for r in replies]

    def example(reply, label, weight):
        return Example([{"role": "user", "content": "q"}], reply, label, "c", "r", reply, 1, weight)

    examples = [example("good", True, 0.2), example("bad", False, 1.4), example("meh", True, 1.4)]
    pairs = [Pair([], "good", "bad", "c", ("a", "b"), 0.5), Pair([], "meh", "good", "c", ("a",), 1.5)]
    w_up, w_down = class_weights(examples)
    assert (w_up, w_down) == pytest.approx((3.0 / (2 * 1.6), 3.0 / (2 * 1.4)))
    bce = lambda z: math.log1p(math.exp(-z))  # noqa: E731 - -log sigmoid(z)
    expected = (w_up * 0.2 * bce(2.0) + w_down * 1.4 * bce(1.0) + w_up * 1.4 * bce(0.5)) / 3 \
        + 2.0 * (0.5 * bce(3.0) + 1.5 * bce(-1.5)) / 2
    assert validation_loss(Fixed(), examples, pairs, RewardConfig(pair_weight=2.0)) == pytest.approx(expected)


def _poisoned_thumbs(weighted: bool):
    """Ten quiet raters like "yes" replies and dislike "no" ones, 4 thumbs
    each; one loud rater says the opposite 120 times (75% of the rows)."""
    from online_rl.influence import rater_weights

    rows = []
    for i in range(40):
        liked = i % 2 == 0
        rows.append((f"quiet{i % 10}", ("yes sure, glad to" if liked else "no, go away now") + f" {i % 7}", liked))
    for i in range(120):
        liked = i % 2 == 1
        rows.append(("loud", ("yes sure, glad to" if not liked else "no, go away now") + f" {i % 7}", liked))
    weights = rater_weights([r for r, _, _ in rows], 0.05 if weighted else 1.0)
    return [Example([{"role": "user", "content": f"can you help with {i}?"}], reply, liked, f"conv-{i}", rater,
                    f"r{i}", i, weight) for i, ((rater, reply, liked), weight) in enumerate(zip(rows, weights))]


def test_a_down_weighted_rater_moves_the_reward_model_less(tiny_loaded):
    """Trained on the same thumbs, the reward model follows the loud rater
    with the bound off and the ten quiet ones with it on."""
    from online_rl.reward import RewardConfig, train_reward_model

    prompts = [[{"role": "user", "content": "help?"}]] * 2
    gaps = {}
    for weighted in (False, True):
        rm, _ = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, _poisoned_thumbs(weighted), [], [], [],
                                   RewardConfig(epochs=2, lr=5e-3, batch_size=16), device=torch.device("cpu"),
                                   progress=lambda line: None)
        yes, no = rm.score(prompts, ["yes sure, glad to 3", "no, go away now 3"])
        gaps[weighted] = yes - no  # positive: the quiet raters' taste
    assert gaps[False] < 0 < gaps[True], gaps


def test_reward_model_continues_from_its_previous_version(tiny_loaded, tmp_path):
    from online_rl.reward import RewardConfig, load_reward_model, train_reward_model

    snap = _synthetic_snapshot(60)
    cfg = RewardConfig(epochs=2, lr=5e-3)
    cpu = torch.device("cpu")
    rm, _ = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap.train, [], snap.heldout, [], cfg,
                               device=cpu, progress=lambda line: None)
    rm.save(tmp_path / "rm1")
    saved = load_reward_model(tiny_loaded.path, tmp_path / "rm1", tiny_loaded.tokenizer, cpu)
    prompts, replies = [e.prompt for e in snap.train[:4]], [e.reply for e in snap.train[:4]]
    assert saved.score(prompts, replies) == pytest.approx(rm.score(prompts, replies), abs=1e-5)
    _, metrics = train_reward_model(tiny_loaded.path, tiny_loaded.tokenizer, snap.train, [], snap.heldout, [], cfg,
                                    device=cpu, previous=tmp_path / "rm1", progress=lambda line: None)
    assert metrics["continued_from"] == str(tmp_path / "rm1")


# -- PPO ----------------------------------------------------------------------------


def test_leave_one_out_advantages_match_a_hand_computation():
    from online_rl.ppo import leave_one_out

    # Two prompts, three replies each: each score minus the mean of the other two.
    adv = leave_one_out(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), 3)
    assert adv.tolist() == pytest.approx([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


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


def _ppo(tiny_trained, anchor=None, reward=starts_with_i, corrections=None, **overrides):
    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.ppo import PPOConfig, PPOTrainer

    settings = dict(steps=10, prompts_per_step=4, samples_per_prompt=4, minibatch=8, epochs=2, lr=3e-3,
                    warmup_steps=0, kl_coef=0.01, adaptive_kl=False, max_kl=100.0, max_approx_kl=10.0,
                    anchor_coef=0.0, seed=0)
    config = PPOConfig(**{**settings, **overrides})
    policy = _fresh_policy(tiny_trained, config)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = PPOTrainer(policy, load_tokenizer(str(tiny_trained)), config,
                         GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1.0), progress=lambda line: None)
    history = trainer.train(PROMPTS, reward, anchor, corrections=corrections)
    return trainer, history, before


def test_ppo_raises_the_score_and_moves_only_lora(tiny_trained):
    trainer, history, before = _ppo(tiny_trained)
    first = sum(h["score"] for h in history[:2]) / 2
    last = sum(h["score"] for h in history[-2:]) / 2
    assert last > first + 0.3, [h["score"] for h in history]
    for key in ("score", "kl", "kl_per_token", "entropy", "clipfrac", "approx_kl", "kl_loss", "anchor_loss",
                "kl_coef", "lr", "updates", "reply_tokens", "eos_fraction"):
        assert key in history[-1]
    assert max(h["reply_tokens"] for h in history) <= 8  # rollouts stop at the serving cap
    assert_only_lora_moved(trainer.unwrapped.policy, before)


def assert_only_lora_moved(policy, before: dict) -> None:
    """Some LoRA weights changed since `before` (name -> tensor); no base weight did."""
    moved_lora = moved_base = 0
    for name, param in policy.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if "lora_" in name:
            moved_lora += changed
        else:
            moved_base += changed
    assert moved_lora > 0 and moved_base == 0


def test_a_large_kl_coefficient_keeps_the_policy_near_the_reference(tiny_trained):
    _, loose, _ = _ppo(tiny_trained, steps=8)
    _, tight, _ = _ppo(tiny_trained, steps=8, kl_coef=20.0)
    loose_kl = sum(h["kl_per_token"] for h in loose[-3:]) / 3
    tight_kl = sum(h["kl_per_token"] for h in tight[-3:]) / 3
    assert tight_kl < 0.5 * loose_kl, (tight_kl, loose_kl)


def test_the_cycle_stops_at_the_kl_cap_and_updates_stop_on_approx_kl(tiny_trained):
    trainer, history, _ = _ppo(tiny_trained, steps=10, lr=3e-2, max_kl=0.05)
    assert len(history) < 10 and history[-1]["kl_per_token"] > 0.05
    assert trainer.stopped and "passed the cap" in trainer.stopped
    _, history, _ = _ppo(tiny_trained, steps=2, max_approx_kl=1e-9)
    assert all(h["updates"] == 1 and h["early_stop"] for h in history)


def test_the_language_anchor_pulls_towards_liked_replies(tiny_trained):
    from chatbot.models import load_tokenizer
    from online_rl.sampling import encode_replies, reply_logprobs

    liked = [(p, "I am fine, thank you.") for p in PROMPTS]
    tokenizer = load_tokenizer(str(tiny_trained))
    batch = encode_replies(tokenizer, [p for p, _ in liked], [r for _, r in liked])

    def nll(model):
        return float(-(reply_logprobs(model, batch).sum() / batch["reply_mask"].sum()))

    flat = lambda prompts, replies: [0.0] * len(replies)  # noqa: E731 - no reward: only the anchor teaches
    trainer, history, _ = _ppo(tiny_trained, anchor=liked, reward=flat, steps=4, anchor_coef=1.0)
    policy = trainer.unwrapped.policy
    with policy.disable_adapter():
        before = nll(policy)
    assert nll(policy) < before - 0.1
    assert history[0]["anchor_loss"] > 0


def test_corrections_are_targets_the_policy_learns_to_write(tiny_trained):
    """No reward and no liked-reply anchor: the corrections alone teach."""
    from chatbot.models import load_tokenizer
    from online_rl.sampling import encode_replies, reply_logprobs

    corrections = [(p, "I am well, thank you for asking.") for p in PROMPTS[:4]]
    tokenizer = load_tokenizer(str(tiny_trained))
    batch = encode_replies(tokenizer, [p for p, _ in corrections], [r for _, r in corrections])

    def nll(model):
        return float(-(reply_logprobs(model, batch).sum() / batch["reply_mask"].sum()))

    flat = lambda prompts, replies: [0.0] * len(replies)  # noqa: E731
    trainer, history, _ = _ppo(tiny_trained, reward=flat, corrections=corrections, steps=4, anchor_coef=0.0,
                               base_anchor_coef=0.0, correction_coef=1.0)
    policy = trainer.unwrapped.policy
    with policy.disable_adapter():
        before = nll(policy)
    assert nll(policy) < before - 0.1
    assert history[0]["correction_loss"] > 0 and history[0]["anchor_loss"] == 0


def test_ppo_draws_prompts_and_liked_replies_in_proportion_to_their_weights(tiny_trained):
    """A prompt holding half the weight is half of every step's draws, and
    of the prompts the base answers for the language anchor."""
    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(steps=50, prompts_per_step=4, samples_per_prompt=2, anchor_batch=8, seed=0)
    trainer = PPOTrainer(_fresh_policy(tiny_trained, config), load_tokenizer(str(tiny_trained)), config,
                         GenerationSettings(max_new_tokens=4), progress=lambda line: None)
    asked, anchored, answered = Counter(), Counter(), Counter()

    def step(prompts, reward_fn, anchor, rng):
        asked.update(p[0]["content"] for p in prompts)
        batch = trainer._anchor_batch(anchor, rng, trainer.anchor_weights)
        anchored.update(tuple(row) for row in batch["reply"].tolist())
        return {"score": 0.0, "kl_per_token": 0.0, "kl_coef": 0.0, "base_nll": 0.0, "reply_tokens": 0.0,
                "anchor_loss": 0.0, "base_anchor_loss": 0.0, "approx_kl": 0.0, "updates": 0, "seconds": 0.0}

    def base_samples(prompts):
        answered.update(p[0]["content"] for p in prompts)
        return []

    trainer.step, trainer._base_samples = step, base_samples
    weights = [7.0] + [1.0] * 7  # "hello" holds half the weight
    liked = [(PROMPTS[0], "I am fine."), (PROMPTS[1], "Hi.")]
    trainer.train(PROMPTS, starts_with_i, liked, prompt_weights=weights, anchor_weights=[3.0, 1.0])
    assert asked["hello"] == 2 * 50 and sum(asked.values()) == 4 * 50
    assert len(asked) == 8  # every prompt is still drawn
    assert answered["hello"] == 4 and sum(answered.values()) == 8
    fine, hi = sorted(anchored.values(), reverse=True)
    assert fine == 6 * 50 and hi == 2 * 50


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


def test_kto_trains_on_a_draw_weighted_by_the_rater_bound():
    from online_rl.kto import bounded_rows

    snap = _synthetic_snapshot(40)
    assert bounded_rows(snap.train) == snap.train  # every weight the same: every thumb once, in order
    for i, example in enumerate(snap.train):
        example.weight = 3.0 if i < 4 else 0.5
    drawn = bounded_rows(snap.train, seed=1)
    assert len(drawn) == len(snap.train)
    counts = Counter(id(e) for e in drawn)
    total = sum(e.weight for e in snap.train)
    for example in snap.train:
        expected = len(snap.train) * example.weight / total
        assert int(expected) <= counts[id(example)] <= int(expected) + 1


def test_the_judge_on_the_training_side_can_vouch_for_a_reward_model_whose_held_out_side_is_small():
    from online_rl.reward_models import better_than_chance, informative, pooled

    def m(auc, low, high, n=20):
        return {"auc": auc, "auc_low": low, "auc_high": high, "heldout_examples": n}

    confident, wide, below = m(0.9, 0.7, 1.0), m(0.78, 0.48, 1.0), m(0.4, 0.01, 0.79)
    judge_says_yes, judge_says_no = m(0.7, 0.6, 0.8, 80), m(0.55, 0.45, 0.65, 80)
    assert informative(confident, None, 0.5) is None
    assert informative(wide, judge_says_yes, 0.5) is None
    assert "nor is the judge" in informative(wide, judge_says_no, 0.5)
    assert "no better than chance" in informative(wide, None, 0.5)
    # the policy's own reward model ranks its held-out thumbs the wrong way: the judge cannot vouch for it
    assert "no better than chance" in informative(below, judge_says_yes, 0.5)
    assert "no held-out thumbs of both kinds" in informative(m(None, None, None, 3), judge_says_yes, 0.5)
    assert informative(below, None, -1.0) is None  # the requirement switched off
    # all the thumbs cross-validated can vouch where neither side can, but not for a reward model that
    # ranks its own held-out thumbs the wrong way
    cv_yes, cv_no = {**m(0.8, 0.7, 0.9, 100), "folds": 5, "examples": 100}, {**m(0.6, 0.45, 0.75, 100), "folds": 5,
                                                                            "examples": 100}
    assert informative(wide, judge_says_no, 0.5, cv_yes) is None
    assert "nor are all 100 thumbs in 5 folds" in informative(wide, judge_says_no, 0.5, cv_no)
    assert "no better than chance" in informative(below, judge_says_no, 0.5, cv_yes)
    # with no held-out thumbs of both kinds there is no judge either: the folds alone do not vouch
    assert "no held-out thumbs of both kinds" in informative(m(None, None, None, 3), None, 0.5, cv_yes)
    # neither side alone, but both pooled: independent estimates of one thing, weighed by their variances
    held, judge = m(0.61, 0.43, 0.79, 74), m(0.567, 0.498, 0.635, 300)
    assert not better_than_chance(held) and not better_than_chance(judge)
    both = pooled(held, judge)
    assert 0.567 < both["auc"] < 0.61 and both["auc_low"] > 0.5
    assert both["auc_high"] - both["auc_low"] < judge["auc_high"] - judge["auc_low"]
    assert informative(held, judge, 0.5) is None
    # pooled with a judge that ranks the wrong way, it does not vouch, and the refusal says so
    assert "nor are both sides pooled" in informative(held, m(0.45, 0.38, 0.52, 300), 0.5)
    assert pooled(held, None) is None and pooled(held, m(None, None, None, 0)) is None


def test_cross_validation_scores_every_thumb_with_a_model_that_never_saw_it(tiny_loaded):
    import random

    from online_rl.reward import RewardConfig
    from online_rl.reward_models import cross_validate, fold_of

    snap = _synthetic_snapshot(60)
    examples = snap.train + snap.heldout
    assert len({fold_of(e.conversation_id, 5) for e in examples}) == 5
    config = RewardConfig(epochs=4, lr=5e-3, batch_size=16, cv_folds=3)
    cv = cross_validate(tiny_loaded.path, tiny_loaded.tokenizer, examples, config, device=torch.device("cpu"),
                        progress=lambda line: None)
    assert cv["examples"] == 60 and cv["folds"] == 3
    assert cv["auc"] >= 0.9 and cv["auc_low"] > 0.5
    # the same replies with coin-flip thumbs: nothing to learn, and the interval says so
    rng = random.Random(3)
    noise = [Example(e.prompt, e.reply, rng.random() < 0.5, e.conversation_id, e.rater, e.response_id,
                     e.feedback_id) for e in examples]
    cv = cross_validate(tiny_loaded.path, tiny_loaded.tokenizer, noise, config, device=torch.device("cpu"),
                        progress=lambda line: None)
    assert cv["auc_low"] <= 0.5
    assert cross_validate(tiny_loaded.path, tiny_loaded.tokenizer, [e for e in examples if e.label], config,
                          device=torch.device("cpu"), progress=lambda line: None) is None  # one kind only
