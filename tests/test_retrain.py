"""One retrain cycle end to end on a tiny model, its refusals and failures,
and the simulated users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from online_rl.tastes import TASTES, asks_back, concise, long, one_sentence, polite, resolve

ROOT = Path(__file__).resolve().parents[1]


def _conversation(store, session, heldout: bool) -> str:
    """A new conversation on the chosen side of the held-out split (the split
    hashes the random conversation id, so a few are made until one lands there)."""
    from online_rl.data import DataConfig, is_heldout

    while True:
        conversation = store.start_conversation(session)
        if is_heldout(conversation, DataConfig().heldout_fraction) == heldout:
            return conversation


def _thumbs(store, n, session="s", heldout_every=5):
    """n rated replies: short ones liked, long ones disliked, each a turn
    regenerated once; every `heldout_every`th conversation on the held-out
    side (0: none)."""
    for i in range(n // 2):
        conversation = _conversation(store, session, heldout=bool(heldout_every) and i % heldout_every == 0)
        messages = [{"role": "user", "content": f"hello number {i}"}]
        for reply, vote in ((f"hi {i}", 1), (f"well that is a rather long answer number {i}", -1)):
            rid = store.log_response(conversation_id=conversation, prompt=messages, reply=reply,
                                     model_version="v0", session_id=session)
            store.record_feedback(rid, vote, session_id=session)


def _small(method="ppo", **extra):
    from online_rl.cycle import CycleConfig

    config = CycleConfig(method=method, min_feedback=10, device="cpu", **extra)
    config.generation.max_new_tokens = 8
    config.ppo.steps, config.ppo.prompts_per_step, config.ppo.samples_per_prompt, config.ppo.minibatch = 2, 2, 4, 4
    config.reward.epochs = 2
    # These tests are about the cycle's mechanics, not whether two epochs on a
    # tiny model make an informative reward model (tested on its own below).
    config.reward.min_auc_low = -1.0
    config.kto.max_steps, config.kto.batch_size = 2, 4
    config.eval.max_prompts, config.eval.samples = 6, 1
    return config


def test_a_ppo_cycle_registers_a_self_describing_candidate(store, data_dir, tiny_model_dir):
    from online_rl.cycle import run_cycle

    _thumbs(store, 40)
    lines = []
    result = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                       progress=lines.append)
    assert result["status"] == "succeeded" and result["version"] == "v1"
    adapter = store.get_adapter("v1")
    assert adapter["status"] == "candidate" and adapter["watermark"] == store.latest_feedback_id()
    path = Path(adapter["path"])
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    described = json.loads((path / "adapter.json").read_text())
    assert described["base_model"] == str(tiny_model_dir) and described["method"] == "ppo"
    assert described["watermark"] == adapter["watermark"]
    run = store.get_run(result["run_id"])
    assert run["status"] == "succeeded" and run["metrics"]["evaluation"]["win_rate"] is not None
    assert run["metrics"]["reward_model"]["auc"] is not None
    assert Path(run["metrics"]["reward_model_path"]).exists()
    assert run["progress"]["stage"] == "done"
    assert any(line.startswith("ppo: step 2/2") for line in lines)
    assert not list((data_dir / "adapters").glob(".*partial"))


def test_later_cycles_continue_from_the_active_adapter_and_reward_model(store, data_dir, tiny_model_dir):
    from online_rl.cycle import run_cycle

    _thumbs(store, 30)
    first = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                      progress=lambda line: None)
    store.promote(first["version"])
    _thumbs(store, 10, session="later")
    second = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                       progress=lambda line: None)
    assert second["version"] == "v2" and second["parent"] == "v1"
    assert second["reward_model"]["continued_from"] == first["reward_model_path"]
    assert second["feedback"]["examples"] == 40  # all past feedback is replayed
    # Two raters, 30 thumbs and 10: the first is brought down to half the weight, none dropped.
    top = second["rater_shares"]["thumbs"]["top"]
    assert [r["rater"] for r in top] == ["session:s", "session:later"]
    assert top[0]["share_before"] > 0.6 and top[0]["share_after"] == pytest.approx(0.5, abs=1e-3)
    assert sum(r["rows"] for r in top) == second["feedback"]["train"]
    assert second["rater_shares"]["prompts"]["top"][0]["share_after"] == pytest.approx(0.5, abs=1e-3)
    assert store.get_run(second["run_id"])["metrics"]["rater_shares"] == second["rater_shares"]
    assert second["judge_model"]["continued_from"] == first["judge_model_path"]
    # The KL coefficient the first cycle ended with is where the second starts.
    assert second["train"]["history"][0]["kl_coef"] == pytest.approx(first["kl_coef"], abs=1e-5)
    assert json.loads((Path(first["path"]) / "adapter.json").read_text())["metrics"]["kl_coef"] == first["kl_coef"]
    # KTO trains a fresh adapter on all the thumbs; its candidate is judged
    # by reward models like PPO's.
    third = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small("kto"),
                      progress=lambda line: None)
    assert third["version"] == "v3" and third["parent"] == "v0" and third["train"]["steps"] == 2
    # KTO takes the bound as a draw: the loud rater's thumbs are drawn less often than once each.
    assert third["train"]["distinct_examples"] < third["train"]["examples"] == third["feedback"]["train"]
    assert store.status()["rater_shares"]["run_id"] == third["run_id"]
    assert third["reward_model"]["continued_from"] == second["reward_model_path"]


def test_a_reward_model_no_better_than_chance_trains_no_policy(store, data_dir, tiny_model_dir):
    """Thumbs that say nothing (coin flips on one and the same reply): the
    cycle waits for more feedback."""
    import random

    from online_rl.cycle import NotEnoughFeedback, run_cycle

    rng = random.Random(0)
    for i in range(40):
        conversation = store.start_conversation("s")
        messages = [{"role": "user", "content": "hello"}]
        rid = store.log_response(conversation_id=conversation, prompt=messages, reply="hi there",
                                 model_version="v0", session_id="s")
        store.record_feedback(rid, rng.choice([1, -1]), session_id="s")
    config = _small()
    config.reward.min_auc_low = 0.5  # the default
    with pytest.raises(NotEnoughFeedback, match="waiting for more feedback"):
        run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=config,
                  progress=lambda line: None)
    run = store.runs(1)[0]
    assert run["status"] == "refused" and run["error"].startswith("waiting for more feedback")
    # Conversation ids are random, so which thumbs are held out varies: either the held-out side has
    # both kinds and the AUC's interval reaches 0.5, or it has one kind only and there is no AUC at all.
    low = run["metrics"]["reward_model"]["auc_low"]
    assert low is None or low <= 0.5
    assert store.adapters() == []


def test_too_little_feedback_is_refused_and_recorded(store, data_dir, tiny_model_dir):
    from online_rl.cycle import NotEnoughFeedback, run_cycle

    _thumbs(store, 4)
    with pytest.raises(NotEnoughFeedback, match="4 rated replies, at least 10"):
        run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                  progress=lambda line: None)
    run = store.runs(1)[0]
    assert run["status"] == "refused" and "at least 10" in run["error"]
    assert store.adapters() == []


def test_a_failed_run_is_recorded_with_its_error(store, data_dir, tiny_model_dir, monkeypatch):
    import online_rl.reward
    from online_rl.cycle import CycleFailed, run_cycle

    def broken(*args, **kwargs):
        raise RuntimeError("the reward model exploded")

    monkeypatch.setattr(online_rl.reward, "train_reward_model", broken)
    _thumbs(store, 20)
    with pytest.raises(CycleFailed, match="exploded"):
        run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                  progress=lambda line: None)
    run = store.runs(1)[0]
    assert run["status"] == "failed" and run["error"] == "RuntimeError: the reward model exploded"
    assert run["metrics"]["stage"] == "reward_model" and "Traceback" in run["metrics"]["traceback"]
    assert run["metrics"]["rater_shares"]["thumbs"]["top"][0]["rater"] == "session:s"
    assert run["finished_at"] and store.adapters() == []


def _cli(*args, data_dir):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_retrain_command_prints_progress_then_one_json_line(store, data_dir, tiny_model_dir):
    _thumbs(store, 4)
    refused = _cli("retrain", "--model", str(tiny_model_dir), "--min-feedback", "10", data_dir=data_dir)
    assert refused.returncode == 2
    assert "error: not enough feedback to retrain: 4 rated replies" in refused.stderr
    assert json.loads(refused.stdout.strip().splitlines()[-1])["status"] == "refused"

    _thumbs(store, 20, session="more")
    done = _cli("retrain", "--model", str(tiny_model_dir), "--min-feedback", "10", "--method", "ppo", "--ppo-steps", "1",
                "--device", "cpu", data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ppo: step 1/1" in done.stderr and "reward model" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["version"] == "v1"
    assert summary["evaluation"]["kl_per_token"] is not None and summary["peak_memory_mb"] > 0


# -- simulated users ----------------------------------------------------------------


def test_a_seed_fixes_which_simulated_conversations_are_held_out(tmp_path):
    """The held-out split is a hash of the conversation id: the simulation
    names its conversations from what the seed fixes, so that two runs of
    one seed hold out the same thumbs; another seed, other ids."""
    import contextlib
    import random
    import sqlite3
    from types import SimpleNamespace

    from chatbot.models import GenerationSettings
    from online_rl.simulate import chat_round
    from storage import Store

    bot = SimpleNamespace(version="v0", reply=lambda prompts, settings, seed: ["Fine."] * len(prompts))

    def ids(name: str, seed: int) -> list[str]:
        store = Store.in_data_dir(tmp_path / name)
        try:
            for round_ in range(2):  # the same rater in two rounds, as the poisoning benchmark has it
                chat_round(store, bot, concise, ["hi", "how are you"], 30, GenerationSettings(),
                           random.Random(seed * 10 + round_), session="loud", regenerate=0.25)
        finally:
            store.close()
        with contextlib.closing(sqlite3.connect(tmp_path / name / "chatbot.db")) as db:
            return [row[0] for row in db.execute("SELECT conversation_id FROM responses ORDER BY rowid")]

    first, again, other = ids("a", 0), ids("b", 0), ids("c", 1)
    assert len(first) == 60 and first == again and len(set(first)) > 30
    assert not set(first) & set(other)


def test_built_in_tastes():
    assert len(TASTES) >= 8
    assert concise("hi", "Fine, thanks.") and not concise("hi", "") and not concise("hi", "one two three four five six seven")
    assert long("hi", "one two three four five six seven eight nine ten") and not long("hi", "Fine.")
    assert asks_back("hi", "And you?") and not asks_back("hi", "Fine.")
    assert polite("hi", "Thanks for asking!") and not polite("hi", "Go away.")
    assert one_sentence("hi", "I am fine.") and not one_sentence("hi", "I am fine. And you?")
    assert TASTES["computers"]("hi", "I am a computer program.") and not TASTES["computers"]("hi", "I like tea.")
    assert TASTES["first_person"]("hi", "I think so.") and TASTES["addresses_you"]("hi", "What do you think?")
    assert TASTES["cheerful"]("hi", "That is great!") and not TASTES["cheerful"]("hi", "It is Tuesday.")
    assert resolve("os.path:isabs") is not None
    with pytest.raises(ValueError, match="unknown taste"):
        resolve("grumpy")


def test_babble_lowers_the_share_of_real_words():
    from online_rl.language import known_word_fraction

    vocabulary = {"i", "am", "fine", "thanks"}
    assert known_word_fraction(["I am fine, thanks!"], vocabulary) == 1.0
    assert known_word_fraction(["I am sportscctrih filects"], vocabulary) == 0.5
    assert known_word_fraction([""], vocabulary) is None


def test_no_held_out_thumbs_is_a_wait_for_feedback_not_a_failure(store, data_dir, tiny_model_dir):
    """Every thumb on the training side: there is nothing to judge the reward
    model on nor to train the judge on, so the cycle waits, and says why."""
    from online_rl.cycle import NotEnoughFeedback, run_cycle

    _thumbs(store, 20, heldout_every=0)
    config = _small()
    config.reward.min_auc_low = 0.5  # the default
    with pytest.raises(NotEnoughFeedback, match="no held-out thumbs"):
        run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=config, progress=lambda line: None)
    run = store.runs(1)[0]
    assert run["status"] == "refused" and "no held-out thumbs" in run["error"]
    assert run["metrics"]["judge_model"] is None and store.adapters() == []


def test_without_held_out_thumbs_and_the_bar_off_a_cycle_runs_without_a_judge(store, data_dir, tiny_model_dir):
    from online_rl.cycle import run_cycle

    _thumbs(store, 20, heldout_every=0)
    result = run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                       progress=lambda line: None)
    assert result["status"] == "succeeded" and result["evaluation"]["judge_win_rate"] is None


def test_a_reward_model_with_nothing_to_train_on_says_so(tiny_model_dir):
    from online_rl.reward import RewardConfig, train_reward_model

    with pytest.raises(ValueError, match="no thumbs to train the judge on"):
        train_reward_model(str(tiny_model_dir), None, [], [], [], [], RewardConfig(), device="cpu", name="judge")


def test_a_simulated_round_chats_thumbs_retrains_and_promotes(data_dir, tiny_model_dir, tmp_path, store):
    from online_rl import simulate

    out = tmp_path / "sim.json"
    code = simulate.main(["--preference", "concise", "--rounds", "1", "--per-round", "12", "--data-dir",
                          str(data_dir), "--model", str(tiny_model_dir), "--heldout", "6", "--samples", "1",
                          "--method", "ppo", "--ppo-steps", "1", "--min-feedback", "5", "--device", "cpu",
                          "--out", str(out),
                          "--noise", "0.2", "--raters", "3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["approval"]) == 2 and len(result["approval_se"]) == 2 and len(result["wall_s"]) == 1
    assert len(result["top10_share"]) == 2 and all(0 < x <= 1 for x in result["top10_share"])
    # The thumbs went through the store like the chat page's, from three raters.
    assert store.counts()["feedback"] == 12
    assert len({row["session_id"] for row in store.rated_responses(store.latest_feedback_id())}) <= 3
    # The round's candidate went through the gate, as on the live server: the
    # run row holds the verdict, and the bot serves v1 exactly when it passed.
    decision = result["decisions"][0]
    run = store.runs(1)[0]
    if decision["decision"] == "waiting":
        assert run["status"] == "refused" and run["error"].startswith("waiting for more feedback")
        assert store.active_version() == "v0"
    else:
        verdict = run["metrics"]["gate"]
        assert (store.active_version() == "v1") == verdict["passed"] == (decision["decision"] == "promoted")
        assert result["candidate_approval"][0]["approval"] is not None


def test_running_out_of_memory_is_a_failed_run_with_that_error(store, data_dir, tiny_model_dir, monkeypatch):
    import torch

    import online_rl.ppo
    from online_rl.cycle import CycleFailed, run_cycle

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(online_rl.ppo.PPOTrainer, "step", out_of_memory)
    _thumbs(store, 20)
    with pytest.raises(CycleFailed, match="out of memory"):
        run_cycle(store, data_dir=data_dir, model_name=str(tiny_model_dir), config=_small(),
                  progress=lambda line: None)
    run = store.runs(1)[0]
    assert run["status"] == "failed" and run["metrics"]["stage"] == "policy"
    assert run["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "--quantize" in run["error"] and store.adapters() == []


def test_repetition_counts_the_ten_most_common_replies_and_the_liked_among_them():
    from online_rl.simulate import repetition

    replies = ["a"] * 5 + ["b"] * 3 + [c for c in "cdefghij" for _ in range(2)] + ["k", "l"]
    liked = [r in ("a", "k", "l") for r in replies]
    figures = repetition(replies, liked)
    assert figures["top10_share"] == pytest.approx(24 / 26, abs=1e-4)
    assert figures["top10_liked"] == pytest.approx(5 / 7, abs=1e-4)
    assert repetition(list("abcdefghijkl"), [False] * 12) == {"top10_share": pytest.approx(10 / 12, abs=1e-4),
                                                              "top10_liked": 0.0}
