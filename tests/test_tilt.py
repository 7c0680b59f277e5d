"""The tilt: the policy's own replies re-weighted by a reward, distilled into LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

PROMPTS = [[{"role": "user", "content": p}] for p in ("hello", "how are you", "what is AI", "tell me a joke",
                                                      "good morning", "who are you", "bye", "thanks")]


def starts_with_i(prompts, replies):
    """A scripted reward: 1 for a reply that starts with "I"."""
    return [1.0 if r.startswith("I") else 0.0 for r in replies]


def test_weights_are_a_softmax_within_each_prompt_of_score_and_language():
    from online_rl.tilt_objective import tilt_weights

    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 2.0, 2.0])
    nll = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.2, 1.2])
    usable = torch.tensor([True, True, True, False, True, True])
    w = tilt_weights(scores, nll, usable, group=3, beta=0.5, language_coef=1.0)
    groups = w.view(2, 3)
    assert torch.allclose(groups.sum(-1), torch.ones(2))
    assert w[3] == 0  # a cut-off or empty reply gets nothing, however it scores
    # By hand: scores standardized over the usable replies, / beta, - NLL.
    usable_scores = scores[usable]
    z = (scores - usable_scores.mean()) / usable_scores.std()
    logits = z[:3] / 0.5 - nll[:3]
    assert torch.allclose(groups[0], torch.softmax(logits, -1), atol=1e-6)
    # Equal scores: the better-formed reply (lower NLL per token) weighs more.
    assert w[4] / w[5] == pytest.approx(math.exp(1.0), rel=1e-5)
    # A prompt without a usable reply is left out altogether.
    none = tilt_weights(scores, nll, torch.tensor([True, True, True, False, False, False]), 3, 0.5, 1.0)
    assert torch.equal(none[3:], torch.zeros(3))
    # With min_spread, a prompt whose usable replies all score alike (the
    # second: 2.0 and 2.0) teaches no taste and is left out; the first stays.
    spread = tilt_weights(scores, nll, usable, 3, 0.5, 1.0, min_spread=0.5)
    assert torch.equal(spread[3:], torch.zeros(3)) and torch.allclose(spread[:3], w[:3])


def test_no_reply_is_the_target_for_more_than_its_share_of_the_prompts():
    from online_rl.tilt_objective import reply_share_cap

    # Ten prompts, two replies each; "stock" takes 0.9 of every prompt's weight but the last's.
    texts = [t for i in range(10) for t in ("stock", f"own {i}")]
    weights = torch.tensor([0.9, 0.1] * 9 + [0.0, 1.0])
    keys = [f"p{i}" for i in range(10)]
    capped = reply_share_cap(weights, texts, keys, 2, max_share=0.2)
    # At most 0.2 of the ten prompts' worth: 2.0 of its 8.1, scaled alike wherever it occurs ...
    assert capped[0:18:2].sum().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(capped[0:18:2], torch.full((9,), 0.9 * 2.0 / 8.1))
    # ... and the other replies keep their weights: nothing is handed to them.
    assert torch.equal(capped[1::2], weights[1::2])
    # A prompt drawn twice counts once: the same two groups under one key are one prompt's worth.
    twice = reply_share_cap(torch.tensor([1.0, 0.0, 1.0, 0.0]), ["a", "b", "a", "b"], ["p", "p"], 2, max_share=0.01)
    assert torch.equal(twice, torch.tensor([1.0, 0.0, 1.0, 0.0]))  # at least one prompt's worth always
    # None: not capped.
    assert torch.equal(reply_share_cap(weights, texts, keys, 2, None), weights)


def _tilt(tiny_trained, reward=starts_with_i, corrections=None, **overrides):
    from transformers import AutoModelForCausalLM

    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.ppo import add_lora
    from online_rl.tilt import TiltConfig, train_tilt

    config = TiltConfig(**{**dict(prompts=32, samples_per_prompt=8, epochs=3, minibatch=8, lr=3e-3,
                                  max_nll_increase=10.0, seed=0), **overrides})
    torch.manual_seed(0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_trained)), config)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    tokenizer = load_tokenizer(str(tiny_trained))
    tokenizer.padding_side = "left"
    # Long enough for most replies to end: a reply cut off at the cap is not chosen.
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=1.0)
    lines = []
    metrics = train_tilt(policy, tokenizer, PROMPTS, reward, settings, config, corrections=corrections,
                         progress=lines.append)
    return policy, tokenizer, settings, metrics, before, lines


def _share_starting_with_i(policy, tokenizer, settings, n=16) -> float:
    from online_rl.sampling import sample_many

    torch.manual_seed(1)
    batches = sample_many(policy, tokenizer, [p for p in PROMPTS for _ in range(n)], settings)
    texts = [t for b in batches for t in b["texts"]]
    return sum(starts_with_i(None, texts)) / len(texts)


def test_the_tilt_raises_the_reward_and_moves_only_lora(tiny_trained):
    from tests.test_learning import assert_only_lora_moved

    policy, tokenizer, settings, metrics, before, lines = _tilt(tiny_trained)
    after = _share_starting_with_i(policy, tokenizer, settings)
    with policy.disable_adapter():
        base = _share_starting_with_i(policy, tokenizer, settings)
    assert after > base + 0.15, (base, after)
    # The target is above what was sampled, and the validation score rises.
    assert metrics["score_target"] > metrics["score_sampled"]
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and metrics["epochs"] == 3
    within = [h for h in history if h["within_bound"]]
    assert within and metrics["epoch_kept"] == max(within, key=lambda h: h["val_score"])["epoch"]
    assert history[-1]["val_score"] > metrics["validation"]["start_score"]
    for key in ("choice_nll", "anchor_kl", "choice_share", "val_nll", "val_excess_nll", "val_known_words",
                "within_bound"):
        assert key in history[-1]
    assert 0 < history[-1]["choice_share"] < 1  # some tokens are choices, the rest are held to the base
    assert any(line.startswith("tilt: epoch 3/3") for line in lines)
    assert_only_lora_moved(policy, before)


def test_epochs_within_the_language_bound_rank_by_score_the_others_by_closeness():
    from online_rl.epoch_bounds import epoch_rank

    def rec(within, score, over):
        return {"within_bound": within, "val_score": score, "over_bounds": over}

    records = [rec(True, 0.2, 0.90), rec(True, 0.5, 0.98), rec(False, 0.9, 1.2), rec(False, 0.8, 1.1)]
    ranked = sorted(records, key=epoch_rank, reverse=True)
    assert ranked == [records[1], records[0], records[3], records[2]]
    assert epoch_rank(rec(True, None, 0.4)) < epoch_rank(rec(True, -5.0, 0.4))


def test_an_epoch_past_the_kl_bound_is_outside_it_though_its_language_holds(tiny_trained):
    # A KL bound no update can meet (any trained epoch moved away from the
    # base) with a language bound every epoch meets.
    policy, tokenizer, settings, metrics, _, lines = _tilt(tiny_trained, max_nll_increase=10.0, max_kl=1e-6,
                                                           epochs=2)
    history = metrics["history"]
    assert all(h["val_kl"] > 1e-6 and h["val_excess_nll"] <= metrics["validation"]["excess_nll_bound"] for h in history)
    assert not any(h["within_bound"] for h in history)
    assert len(history) == 2  # past the KL bound, not the language's: no second attempt
    assert metrics["epoch_kept"] == min(history, key=lambda h: h["over_bounds"])["epoch"]
    assert metrics["validation"]["kl_bound"] == 1e-6
    assert any("no epoch stayed within the bounds (language, KL, repetition)" in line for line in lines)


def test_the_cycle_bounds_the_tilt_a_tenth_inside_the_gate():
    from online_rl.gate import GateConfig
    from online_rl.epoch_bounds import within_gate
    from online_rl.tilt import TiltConfig

    gate = GateConfig(max_kl=0.3, max_top_share=0.25, min_distinct=0.6)
    bounded = within_gate(TiltConfig(), gate)
    assert (bounded.max_kl, bounded.max_top_share) == pytest.approx((0.27, 0.225))
    assert bounded.max_nll_increase == pytest.approx(0.9 * gate.max_nll_increase)
    assert bounded.min_distinct == pytest.approx(0.6 / 0.9)
    assert bounded.max_top_ten_increase == pytest.approx(0.9 * gate.max_top_ten_increase)
    assert bounded.max_reply_share == pytest.approx(0.9 * gate.max_top_ten_increase / 10)
    assert within_gate(TiltConfig(max_kl=0.1), gate).max_kl == 0.1  # one set stays


def test_an_epoch_that_spreads_one_reply_over_the_prompts_is_outside_the_bounds(tiny_trained):
    # Bounds no sampled replies can meet: no reply more common than 0% of
    # the prompts' (any reply is), at least 100 times the base's distinct share.
    policy, tokenizer, settings, metrics, _, lines = _tilt(tiny_trained, max_top_share=1e-6, min_distinct=100.0,
                                                           epochs=1)
    [record] = metrics["history"]
    assert not record["within_bound"] and record["over_bounds"] > 1
    assert 0 < record["val_top_reply_share"] <= 1 and 0 < record["val_distinct"] <= 1
    assert 0 < metrics["validation"]["base_distinct"] <= 1


def test_an_epoch_whose_ten_most_common_replies_take_more_prompts_than_the_base_ten_is_outside_the_bounds(
        tiny_trained):
    # A bound below zero: the ten most common replies must take fewer prompts than the base's ten do.
    policy, tokenizer, settings, metrics, _, lines = _tilt(tiny_trained, max_top_ten_increase=-1.0, epochs=1)
    [record] = metrics["history"]
    assert not record["within_bound"] and record["over_bounds"] > 1
    assert 0 < record["val_top_ten_share"] <= 1 and 0 < metrics["validation"]["base_top_ten"] <= 1
    assert any("ten most common" in line for line in lines)


def test_without_an_epoch_within_the_language_bound_it_starts_again_weighing_language_more(tiny_trained):
    # A bound no reply can meet (an excess NLL per token five times the base's NLL below zero).
    policy, tokenizer, settings, metrics, _, lines = _tilt(tiny_trained, max_nll_increase=-5.0, epochs=2)
    history = metrics["history"]
    assert not any(h["within_bound"] for h in history)
    # Two more attempts from the parent, each with the language weighed twice as much.
    assert [h["language_coef"] for h in history] == [2.0, 2.0, 4.0, 4.0, 8.0, 8.0]
    assert [h["epoch"] for h in history] == [1, 2] * 3
    assert sum("again from where the cycle started, with the language weighed" in line for line in lines) == 2
    closest = min(history, key=lambda h: h["over_bounds"])
    assert (metrics["epoch_kept"], metrics["language_coef"]) == (closest["epoch"], closest["language_coef"])
    assert any("no epoch stayed within the bounds (language, KL, repetition)" in line for line in lines)


CORRECTION = "I am well, thank you for asking."


def test_corrections_the_reward_model_likes_are_targets_the_tilt_learns_to_write(tiny_trained):
    """A reward that likes only the corrections (as one trained on the pair
    of a correction over the reply it corrects would): the tilt learns to
    write them."""
    from online_rl.sampling import encode_replies, reply_logprobs

    corrections = [(p, CORRECTION) for p in PROMPTS[:4]]
    likes = lambda prompts, replies: [1.0 if r == CORRECTION else 0.0 for r in replies]  # noqa: E731
    policy, tokenizer, _, metrics, _, lines = _tilt(tiny_trained, reward=likes, corrections=corrections,
                                                   correction_coef=2.0, epochs=2)
    batch = encode_replies(tokenizer, [p for p, _ in corrections], [r for _, r in corrections])

    def nll(model):
        return float(-(reply_logprobs(model, batch).sum() / batch["reply_mask"].sum()))

    with policy.disable_adapter():
        before = nll(policy)
    assert nll(policy) < before - 0.1, (before, nll(policy))
    assert metrics["corrections"] == 4 and metrics["correction_share"] > 0.9
    assert any("4 corrections, each beside 8 of the policy's replies" in line for line in lines)


def test_a_correction_far_from_the_base_language_hands_its_weight_to_the_policys_replies(tiny_trained):
    from transformers import AutoModelForCausalLM

    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.corrections import correction_groups
    from online_rl.ppo import add_lora
    from online_rl.sampling import sample_many
    from online_rl.tilt import TiltConfig

    config = TiltConfig(samples_per_prompt=4)
    torch.manual_seed(0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_trained)), config)
    tokenizer = load_tokenizer(str(tiny_trained))
    tokenizer.padding_side = "left"
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=1.0)
    # In the base's language: a reply the base itself writes to the prompt.
    [own] = sample_many(policy, tokenizer, PROMPTS[:1], settings)[0]["texts"]
    babble = "zq xv kkk plorf qqq vzz ttt"
    flat = lambda prompts, replies: [0.0] * len(replies)  # noqa: E731
    pairs = [(PROMPTS[0], own), (PROMPTS[0], babble)] * 4
    chats, texts, weights = correction_groups(policy, tokenizer, pairs, [1.0, 3.0] * 4, flat, settings, config,
                                              (0.0, 1.0), reference_nll=1.0)
    groups = weights.view(8, 5)
    assert texts[4] == own and texts[9] == babble and chats[0] == chats[9] == PROMPTS[0]
    # Each group weighs at most its rater-bound weight over their mean (0.5
    # and 1.5), all of it where the policy wrote a usable reply.
    limit = torch.tensor([0.5, 1.5] * 4)
    assert (groups.sum(-1) <= limit + 1e-5).all()
    # Scored alike, the babble holds far less than the reply in the base's
    # language: its weight goes to the policy's own replies, or, where the
    # policy wrote none it could use, it keeps little of its own.
    share = groups[:, 4] / limit
    assert (share[1::2] < 0.05).all() and share[0::2].mean() > 5 * share[1::2].max(), share.tolist()


def test_a_tilt_cycle_continues_from_the_active_adapter(store, data_dir, tiny_model_dir):
    from online_rl.cycle import CycleConfig, run_cycle
    from tests.test_retrain import _thumbs

    def small():
        config = CycleConfig(method="tilt", min_feedback=10, device="cpu")
        config.generation.max_new_tokens = 8
        config.reward.epochs, config.reward.min_auc_low = 2, -1.0
        config.tilt.prompts, config.tilt.samples_per_prompt, config.tilt.epochs = 8, 4, 1
        config.eval.max_prompts, config.eval.samples = 6, 1
        return config

    _thumbs(store, 30)
    lines = []
    first = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=small(),
                      progress=lines.append)
    assert first["status"] == "succeeded" and first["parent"] == "v0" and first["method"] == "tilt"
    assert first["train"]["epoch_kept"] == 1 and first["train"]["replies"] == 32
    # The epoch stop judged on the prompts the gate judged on.
    assert first["train"]["validation_prompts"] == first["evaluation"]["prompts"] > 0
    assert any(line.startswith("tilt: epoch 1/1") for line in lines)
    described = json.loads((Path(first["path"]) / "adapter.json").read_text())
    assert described["method"] == "tilt" and described["config"]["tilt"]["prompts"] == 8
    store.promote(first["version"])
    second = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=small(),
                       progress=lambda line: None)
    assert second["version"] == "v2" and second["parent"] == "v1"
    run = store.get_run(second["run_id"])
    assert run["kind"] == "tilt" and run["status"] == "succeeded"


def test_the_tilts_validation_prompts_are_the_same_in_every_cycle_and_the_gate_judges_on_them_too():
    from types import SimpleNamespace

    from online_rl.cycle import CycleConfig, judged_prompts
    from online_rl.tilt import validation_split

    pool = [[{"role": "user", "content": f"question {i}"}] for i in range(200)]
    split = validation_split(pool, 0.2)
    assert 20 < sum(split) < 60
    # the same prompts whatever else the pool holds, in whatever order
    again = validation_split(list(reversed(pool[50:])), 0.2)
    assert [p for p, v in zip(reversed(pool[50:]), again) if v] == [p for p, v in zip(reversed(pool[50:]),
                                                                               reversed(split[50:])) if v]
    assert not any(validation_split(pool[:19], 0.2))  # a small pool keeps nothing out

    held = [[{"role": "user", "content": f"held-out {i}"}] for i in range(5)]
    snap = SimpleNamespace(heldout_prompts=held, heldout=[], prompts=pool, prompt_weights=[1.0] * 200, train=[])
    tilt = judged_prompts(snap, CycleConfig(method="tilt"))
    validation = [p for p, v in zip(pool, split) if v]
    assert tilt[:4] == [held[0], validation[0], held[1], validation[1]]
    assert sorted(map(str, tilt)) == sorted(map(str, held + validation))
    assert judged_prompts(snap, CycleConfig(method="ppo")) == held  # PPO trains on every pool prompt


def test_given_validation_prompts_the_tilt_judges_its_epochs_there_and_never_trains_on_them(tiny_trained):
    from transformers import AutoModelForCausalLM

    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.ppo import add_lora
    from online_rl.tilt import TiltConfig, train_tilt

    config = TiltConfig(prompts=12, samples_per_prompt=2, epochs=1, minibatch=8, language_retries=0,
                        validation_replies=6, max_nll_increase=10.0)
    torch.manual_seed(0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_trained)), config)
    tokenizer = load_tokenizer(str(tiny_trained))
    tokenizer.padding_side = "left"
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1.0)
    elsewhere = [[{"role": "user", "content": "a prompt of the gate's own"}]]
    validation = PROMPTS[:2] + elsewhere  # two of the pool's, one from outside it
    calls = []

    def reward(prompts, replies):
        calls.append({p[-1]["content"] for p in prompts})
        return starts_with_i(prompts, replies)

    metrics = train_tilt(policy, tokenizer, PROMPTS, reward, settings, config, validation=validation,
                         progress=lambda line: None)
    judged = {p[-1]["content"] for p in validation}
    trained, *validated = calls  # the training replies are scored first, then the validation replies
    assert trained and not trained & judged
    assert validated and all(c <= judged for c in validated) and set().union(*validated) == judged
    assert metrics["validation_prompts"] == 3


def test_the_step_loss_charges_served_words_outside_the_bases_nucleus(tiny_trained):
    from transformers import AutoModelForCausalLM

    from chatbot.models import GenerationSettings, load_tokenizer
    from online_rl.ppo import add_lora
    from online_rl.sampling import encode_replies
    from online_rl.tilt import TiltConfig
    from online_rl.tilt_objective import step_loss

    config = TiltConfig()
    torch.manual_seed(0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_trained)), config)
    tokenizer = load_tokenizer(str(tiny_trained))
    tokenizer.padding_side = "left"
    settings = GenerationSettings(temperature=0.8, top_p=0.5)
    batch = encode_replies(tokenizer, PROMPTS[:4], ["I am fine.", "hello there", "I do not know.", "bye"])
    weights = torch.full((4,), 0.25)
    # A fresh adapter is the base: nothing it serves lies outside the base's nucleus.
    _, parts = step_loss(policy, batch, weights, config, settings, 16.0)
    assert parts["outside"] == 0.0
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    plain, parts_plain = step_loss(policy, batch, weights, config, settings, 0.0)
    charged, parts_charged = step_loss(policy, batch, weights, config, settings, 16.0)
    assert parts_charged["outside"] > 0.01
    assert charged.item() == pytest.approx(plain.item() + 16.0 * parts_charged["outside"], rel=1e-4)
    # Its gradient moves the adapter back towards the base's words.
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(5):
        loss, _ = step_loss(policy, batch, weights, TiltConfig(anchor_coef=0.0), settings, 16.0)
        optimizer.zero_grad()
        (loss - step_loss(policy, batch, weights, TiltConfig(anchor_coef=0.0), settings, 0.0)[0]).backward()
        optimizer.step()
    _, after = step_loss(policy, batch, weights, config, settings, 16.0)
    assert after["outside"] < parts_charged["outside"]


def _scripted_tilts(monkeypatch, records):
    """`train_tilt` replaced by one that adds 1 to the policy's weights and
    reports the next of `records` (val_score, within_bound) as its kept epoch."""
    from online_rl import tilt

    calls = []

    def fake(policy, *args, **kwargs):
        calls.append(args[4].seed)
        with torch.no_grad():
            policy.weight.add_(1.0)
        score, within = records[len(calls) - 1]
        start = records[len(calls) - 2][0] if len(calls) > 1 else 0.0  # the version before, sampled afresh
        kept = {"val_score": score, "within_bound": within, "val_excess_nll": 0.0, "val_kl": 0.0}
        return {"kept": kept, "epoch_kept": 1, "score_sampled": 0.0, "score_target": 1.0, "seconds": 2.0,
                "validation": {"start_score": start}, "call": len(calls)}

    monkeypatch.setattr(tilt, "train_tilt", fake)
    return calls


@pytest.mark.parametrize("second, kept_calls, weight", [((2.0, True), 2, 2.0), ((0.5, True), 1, 1.0),
                                                         ((3.0, False), 1, 1.0)])
def test_a_second_tilt_is_kept_only_when_it_scores_higher_within_the_bounds(monkeypatch, second, kept_calls, weight):
    from online_rl.tilt import TiltConfig, grow_tilt

    calls = _scripted_tilts(monkeypatch, [(1.0, True), second])
    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.zero_()
    metrics = grow_tilt(policy, None, PROMPTS, starts_with_i, None, TiltConfig(grow_steps=2, seed=5),
                        progress=lambda line: None)
    assert calls == [5, 6]  # the second tilt samples afresh
    assert metrics["call"] == kept_calls and metrics["grow_kept"] == kept_calls
    assert [s["kept"] for s in metrics["grow"]] == [True, kept_calls == 2] and metrics["seconds"] == 4.0
    # a step that is not kept leaves the policy where the step before left it
    assert policy.weight.item() == weight


def test_no_second_tilt_after_one_past_the_bounds(monkeypatch):
    from online_rl.tilt import TiltConfig, grow_tilt

    calls = _scripted_tilts(monkeypatch, [(1.0, False), (2.0, True)])
    policy = torch.nn.Linear(1, 1, bias=False)
    metrics = grow_tilt(policy, None, PROMPTS, starts_with_i, None, TiltConfig(grow_steps=3),
                        progress=lambda line: None)
    assert len(calls) == 1 and metrics["grow_kept"] == 1 and len(metrics["grow"]) == 1
