"""The adapter registry (promote, rollback, its log), the evaluation gate,
and the command line that drives them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from online_rl.gate import GateConfig, apply, decide
from storage import StoreError

ROOT = Path(__file__).resolve().parents[1]


def _register(store, tmp_path, version, status="candidate"):
    path = tmp_path / "adapters" / version
    path.mkdir(parents=True)
    store.register_adapter(version, path=str(path), base_model="tiny", status=status)
    return path


# -- registry ---------------------------------------------------------------------


def test_promote_and_rollback_walk_the_activation_log(store, tmp_path):
    for v in ("v1", "v2", "v3"):
        _register(store, tmp_path, v)
    assert store.promote("v1")["previous"] == "v0"
    store.promote("v2")
    store.promote("v3")
    assert store.active_version() == "v3"
    # Back to what was active before v3, then before v2: a stack, not a toggle.
    assert store.rollback() == {"active": "v2", "previous": "v3", "changed": True}
    assert store.get_adapter("v3")["reason"] == "rolled back to v2"
    assert store.get_adapter("v3")["status"] == "retired"
    assert store.rollback()["active"] == "v1"
    assert store.rollback()["active"] == "v0"
    assert [a["status"] for a in store.adapters()] == ["retired", "retired", "retired"]
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback()
    assert store.rollback(to="v3")["active"] == "v3"
    assert [a["action"] for a in store.activations()] == ["rollback", "rollback", "rollback", "rollback",
                                                         "promote", "promote", "promote"]


def test_promote_refuses_unknown_or_missing_versions(store, tmp_path):
    path = _register(store, tmp_path, "v1")
    with pytest.raises(StoreError, match="no adapter 'v7'"):
        store.promote("v7")
    with pytest.raises(StoreError, match="v1, v2"):
        store.promote("latest")
    for odd in ("v²", "v١", "v-1", "V1", "v"):  # superscript and Arabic-Indic digits pass str.isdigit()
        with pytest.raises(StoreError, match="v1, v2"):
            store.promote(odd)
    path.rmdir()
    with pytest.raises(StoreError, match="files are missing"):
        store.promote("v1")
    assert store.active_version() == "v0" and store.activations() == []


def test_a_fallback_is_logged_only_while_the_broken_version_is_active(store, tmp_path):
    for v in ("v1", "v2", "v3"):
        _register(store, tmp_path, v)
    store.promote("v1")
    store.promote("v2")
    store.rollback()
    store.promote("v3")
    assert store.earlier_versions() == ["v1", "v2", "v0"]  # most recently active first
    assert store.fall_back("v2", "v1", reason="v2 does not load") is None  # v2 is not the active one
    assert store.active_version() == "v3" and store.activations()[0]["action"] == "promote"
    assert store.fall_back("v3", "v1", reason="v3 does not load: no weights file") == {
        "active": "v1", "previous": "v3", "changed": True}
    row = store.activations()[0]
    assert (row["action"], row["actor"], row["reason"]) == ("fallback", "server", "v3 does not load: no weights file")
    assert store.get_adapter("v3")["reason"] == "fell back to v1: v3 does not load: no weights file"
    # v1 was last promoted from v0; the fallback's "previous" is the version that broke.
    assert store.rollback_target() == "v0" and store.rollback()["active"] == "v0"


def test_a_rejected_candidate_can_still_be_promoted_by_hand(store, tmp_path):
    _register(store, tmp_path, "v1", status="rejected")
    store.promote("v1", actor="ops")
    assert store.get_adapter("v1")["status"] == "active"


def _cli(*args, data_dir):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)


def test_promote_and_rollback_from_the_command_line(store, data_dir, tiny_model_dir):
    from conftest import make_adapter

    path = make_adapter(tiny_model_dir, data_dir / "adapters" / "v1", 1, str(tiny_model_dir))
    store.register_adapter("v1", path=str(path), base_model=str(tiny_model_dir))
    done = _cli("promote", "v1", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"active": "v1", "previous": "v0", "changed": True}
    status = json.loads(_cli("status", data_dir=data_dir).stdout)
    assert status["active_version"] == "v1" and status["adapters_by_version"][0]["status"] == "active"
    bad = _cli("promote", "v9", data_dir=data_dir)
    assert bad.returncode == 1 and bad.stderr.startswith("error: no adapter 'v9'") and "Traceback" not in bad.stderr
    back = _cli("rollback", data_dir=data_dir)
    assert back.returncode == 0 and json.loads(back.stdout)["active"] == "v0"
    assert store.active_version() == "v0"


@pytest.mark.parametrize("args", [("promote", "v²"), ("promote", "v١"), ("rollback", "--to", "v²")])
def test_a_version_name_other_than_v_and_ascii_digits_is_a_one_line_cli_error(store, data_dir, tmp_path, args):
    _register(store, tmp_path, "v1")
    result = _cli(*args, data_dir=data_dir)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: a version looks like v0, v1, v2, ...; got {args[-1]!r}"]
    assert store.active_version() == "v0" and store.activations() == []


# -- the gate -----------------------------------------------------------------------


def _evaluation(**overrides):
    stats = {"distinct_fraction": 0.9, "top_reply_share": 0.1, "top_ten_share": 0.2, "empty_fraction": 0.0,
             "cut_off_fraction": 0.1, "mean_words": 5}
    evaluation = {"prompts": 20, "win_rate": 0.6, "judge_win_rate": 0.55, "judge_informative": True,
                  "kl_per_token": 0.2, "nan": False, "heldout_thumbs": {"margin": 0.01, "se": 0.02},
                  "base_nll": {"candidate": 1.5, "active": 1.45, "base": 1.4},
                  "excess_nll": {"candidate": 0.05, "active": 0.04, "base": 0.0},
                  "known_words": {"candidate": 0.95, "active": 0.96, "base": 0.96},
                  "candidate": dict(stats), "active": dict(stats), "base": dict(stats), "active_version": "v0"}
    for key, value in overrides.items():
        if key in stats:
            evaluation["candidate"][key] = value
        else:
            evaluation[key] = value
    return evaluation


def test_a_good_candidate_passes_the_gate():
    verdict = decide(_evaluation())
    assert verdict.passed and verdict.reason() == "passed every check"


@pytest.mark.parametrize("overrides, reason", [
    ({"win_rate": 0.4}, "did not beat the active version under its own reward model: win rate 0.400"),
    ({"win_rate": 0.5}, "did not beat the active version under its own reward model: win rate 0.500"),
    ({"judge_win_rate": 0.3}, "the judge (a reward model the update never saw) prefers the active version: win rate 0.300"),
    ({"heldout_thumbs": {"margin": -0.1, "se": 0.02}}, "moved away from what people liked"),
    ({"kl_per_token": 0.9}, "KL to the base 0.900 nats per token"),
    ({"excess_nll": {"candidate": 0.2, "base": 0.0}}, "excess NLL per token of its replies (above its own "
                                                      "choices at the same positions) is +0.200"),
    ({"known_words": {"candidate": 0.85, "base": 0.96}}, "85% of its words are known words"),
    ({"nan": True}, "NaN"),
    ({"distinct_fraction": 0.05}, "only 5% of its replies are distinct"),
    # Against the base's own 90%: at least 54%.
    ({"distinct_fraction": 0.5}, "only 50% of its replies are distinct (at least 54%, 60% of the base's own)"),
    ({"top_reply_share": 0.3}, "one reply is 30%"),
    # Against the base's ten most common at 20%: at most 40%.
    ({"top_ten_share": 0.45}, "its ten most common replies are 45% of its replies, against 20% for the base "
                              "(at most 40%)"),
    ({"empty_fraction": 0.5}, "50% empty replies"),
    ({"cut_off_fraction": 0.9}, "90% of its replies are cut off"),
    ({"prompts": 2}, "only 2 held-out prompts"),
])
def test_each_check_of_the_gate_can_reject(overrides, reason):
    verdict = decide(_evaluation(**overrides))
    assert not verdict.passed and reason in verdict.reason()


def test_ten_stock_replies_are_judged_against_the_base_own_ten():
    assert decide(_evaluation(top_ten_share=0.4)).passed
    # A base that repeats itself more leaves the candidate as much more room, no more.
    evaluation = _evaluation(top_ten_share=0.45)
    evaluation["base"]["top_ten_share"] = 0.3
    assert decide(evaluation).passed
    # An evaluation from before the measure existed is not judged on it.
    evaluation = _evaluation(top_ten_share=0.9)
    del evaluation["base"]["top_ten_share"]
    assert decide(evaluation).passed


def test_gate_thresholds_are_settings():
    assert decide(_evaluation(win_rate=0.45), GateConfig(min_win_rate=0.4)).passed
    assert not decide(_evaluation(kl_per_token=0.3), GateConfig(max_kl=0.25)).passed


def test_language_is_judged_against_the_base_with_a_small_absolute_slack():
    # On prompts the base knows by heart its own replies cost it ~0.01 nats a token: 10% of that is noise.
    known = {"candidate": 0.012, "base": 0.012}
    assert decide(_evaluation(base_nll=known, excess_nll={"candidate": 0.018, "base": 0.0})).passed
    assert not decide(_evaluation(base_nll=known, excess_nll={"candidate": 0.025, "base": 0.0})).passed


def test_the_slack_is_not_added_to_the_relative_bound():
    # At the starter's own 0.45 nats a token, 10% is 0.045: the 0.02 slack does not widen it to 14%.
    nll = {"candidate": 0.6, "base": 0.45}
    assert decide(_evaluation(base_nll=nll, excess_nll={"candidate": 0.04, "base": 0.0})).passed
    verdict = decide(_evaluation(base_nll=nll, excess_nll={"candidate": 0.05, "base": 0.0}))
    assert not verdict.passed and "above the bound of +0.045" in verdict.reason()
    assert verdict.checks["excess_nll_bound"] == pytest.approx(0.045)


def test_the_plain_nll_per_token_is_reported_not_bounded():
    # Short replies cost more per token (their first tokens are the uncertain ones) with no word less
    # likely: the bound is on the excess over the base's own choices, not on the plain figure.
    verdict = decide(_evaluation(base_nll={"candidate": 0.6, "base": 0.45},
                                 excess_nll={"candidate": -0.01, "base": 0.0}))
    assert verdict.passed and verdict.checks["base_nll"] == 0.6


def test_few_held_out_prompts_get_more_replies_each():
    from online_rl.evaluate import EvalConfig, samples_per_prompt

    config = EvalConfig(samples=4, min_replies=256, max_samples=16)
    assert samples_per_prompt(64, config) == 4
    assert samples_per_prompt(26, config) == 10  # 260 replies per version
    assert samples_per_prompt(5, config) == 16  # never more than max_samples each
    assert samples_per_prompt(200, config) == 4


def test_degenerate_shares_take_one_reply_per_prompt():
    from online_rl.evaluate import reply_stats

    # Four samples of each of three prompts: the same reply every time it is asked one thing is fine ...
    stats = reply_stats(["a"] * 4 + ["b"] * 4 + ["c"] * 4, [True] * 12, samples=4)
    assert stats["distinct_fraction"] == 1.0 and stats["top_reply_share"] == pytest.approx(1 / 3, abs=1e-3)
    # ... one reply for every prompt is not.
    assert reply_stats(["a"] * 12, [True] * 12, samples=4)["distinct_fraction"] == pytest.approx(1 / 3, abs=1e-3)


def test_the_top_ten_share_counts_the_prompts_the_ten_most_common_replies_take():
    from online_rl.evaluate import reply_stats, top_ten_share

    # Ten stock replies said to two prompts each, and ten replies said once: 20 of 30.
    replies = [f"stock {i}" for i in range(10)] * 2 + [f"own {i}" for i in range(10)]
    assert top_ten_share(replies) == pytest.approx(2 / 3, abs=1e-3)
    assert top_ten_share([f"own {i}" for i in range(40)]) == 0.25  # all distinct: ten of forty
    assert top_ten_share([]) == 0.0
    # One reply per prompt: two samples each of the thirty prompts above count once.
    stats = reply_stats([r for r in replies for _ in range(2)], [True] * 60, samples=2)
    assert stats["top_ten_share"] == pytest.approx(2 / 3, abs=1e-3)


def test_degenerate_shares_are_averaged_over_the_draws():
    from online_rl.evaluate import reply_stats

    # Twenty prompts, two draws each: the first draw says one of ten stock replies to every prompt,
    # the second a reply of its own to each. Each draw is judged over the prompts, and the two averaged.
    texts = [reply for i in range(20) for reply in (f"stock {i % 10}", f"own {i}")]
    stats = reply_stats(texts, [True] * 40, samples=2)
    assert stats["top_ten_share"] == pytest.approx((1.0 + 0.5) / 2, abs=1e-3)
    assert stats["top_reply_share"] == pytest.approx((0.1 + 0.05) / 2, abs=1e-3)
    assert stats["distinct_fraction"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-3)
    assert reply_stats([], [], samples=2)["top_ten_share"] == 0.0


def test_an_uninformative_judge_is_not_used():
    verdict = decide(_evaluation(judge_win_rate=0.3, judge_informative=False))
    assert verdict.passed and verdict.checks["judge_used"] is False


def test_the_judge_turns_a_candidate_away_only_when_it_prefers_the_active_version_beyond_its_noise():
    # Within two standard errors of 0.5: not shown worse, passes.
    near = decide(_evaluation(judge_win_rate=0.46, judge_win_rate_se=0.025))
    assert near.passed and near.checks["judge_bar"] == pytest.approx(0.45)
    # Beyond them: the judge prefers the active version, rejected, with the bar in the reason.
    far = decide(_evaluation(judge_win_rate=0.44, judge_win_rate_se=0.025))
    assert not far.passed
    assert "win rate 0.440 (at least 0.450: 0.50 less 2 standard errors of 0.025)" in far.reason()
    # With no standard error (an older evaluation) or judge_se 0 the point estimate decides.
    assert not decide(_evaluation(judge_win_rate=0.49)).passed
    assert not decide(_evaluation(judge_win_rate=0.46, judge_win_rate_se=0.025), GateConfig(judge_se=0)).passed
    # The policy's own reward model keeps its plain bar: a candidate must climb the reward it was trained on.
    assert not decide(_evaluation(win_rate=0.49, judge_win_rate=0.6, judge_win_rate_se=0.05)).passed


def test_the_win_rates_standard_error_takes_the_prompts_as_units():
    from online_rl.evaluate import win_rate, win_rate_se

    # Two prompts, four replies each: one prompt all wins, one all losses.
    cand, act = [1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4
    assert win_rate(cand, act) == 0.5
    # Per prompt 1.0 and 0.0: sd 0.707 over two prompts, se 0.5 (the 8 replies alone would claim 0.19).
    assert win_rate_se(cand, act, samples=4) == pytest.approx(0.5)
    # Every reply a tie: no spread, no error.
    assert win_rate_se([1.0] * 8, [1.0] * 8, samples=4) == 0.0
    assert win_rate_se([1.0] * 4, [0.0] * 4, samples=4) is None  # one prompt


def test_gate_records_its_decision_in_the_registry(store, tmp_path):
    _register(store, tmp_path, "v1")
    _register(store, tmp_path, "v2")
    assert apply(store, "v1", _evaluation()).passed
    assert store.active_version() == "v1" and store.activations()[0]["action"] == "gate"
    verdict = apply(store, "v2", _evaluation(win_rate=0.2, active_version="v1"))
    assert not verdict.passed
    assert store.get_adapter("v2")["status"] == "rejected" and "win rate 0.200" in store.get_adapter("v2")["reason"]
    assert store.active_version() == "v1"


def test_gate_leaves_a_candidate_alone_when_the_active_version_changed_meanwhile(store, tmp_path):
    _register(store, tmp_path, "v1")
    _register(store, tmp_path, "v2")
    store.promote("v1")
    verdict = apply(store, "v2", _evaluation(active_version="v0"))
    assert not verdict.passed and "became active meanwhile" in verdict.reason()
    assert store.get_adapter("v2")["status"] == "candidate" and store.active_version() == "v1"


def test_gate_rejects_a_babbling_candidate_that_wins_on_its_training_reward_model(tiny_trained, store, tmp_path):
    """A candidate whose LoRA is large noise babbles (served without the
    restriction to its base's words, `--no-within-base`), and the reward
    model it was "trained" on loves babble: it wins there, but the real
    evaluation on held-out prompts measures its language against the
    base's, and the gate rejects it for that."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.models import GenerationSettings
    from online_rl.evaluate import EvalConfig, compare

    tokenizer = AutoTokenizer.from_pretrained(tiny_trained)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_trained),
                           LoraConfig(r=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    prompts = [[{"role": "user", "content": text}] for text in
               ("hello", "how are you", "what is your name", "do you like music", "tell me a joke",
                "good morning", "who are you", "what can you do")]

    def loves_babble(prompts, replies):  # the reward model PPO would have chased
        return [float(len(set(r))) for r in replies]

    evaluation = compare(model, tokenizer, prompts,
                         GenerationSettings(max_new_tokens=16, temperature=1.0, within_base=False),
                         loves_babble, EvalConfig(samples=2))
    evaluation["active_version"] = "v0"
    assert evaluation["win_rate"] > 0.5  # it did win where it was trained
    assert evaluation["base_nll"]["candidate"] > 1.1 * evaluation["base_nll"]["base"]
    assert evaluation["excess_nll"]["base"] == pytest.approx(0.0, abs=1e-4)  # the base's own choices: 0 by definition
    assert evaluation["excess_nll"]["candidate"] > 0.1
    _register(store, tmp_path, "v1")
    verdict = apply(store, "v1", evaluation)
    assert not verdict.passed
    assert "its language drifted" in verdict.reason() and "KL to the base" in verdict.reason()
    assert store.get_adapter("v1")["status"] == "rejected" and store.active_version() == "v0"
