"""Corrections: a better reply a person writes in place of the bot's becomes
a pair (the correction over the reply) for the reward model and a liked
reply (a supervised target) for the policy, in TRL's shapes on export, under
the same rater bound, rate limit and HTML escaping as thumbs."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import httpx
import pytest

from storage import StoreError

PROMPT = [{"role": "user", "content": "how are you"}]


def reply(store, text="fine.", conversation=None, prompt=PROMPT):
    conversation = conversation or store.start_conversation("s")
    return store.log_response(conversation_id=conversation, prompt=prompt, reply=text, model_version="v0",
                              session_id="s")


def test_a_correction_is_a_pair_and_a_liked_reply_in_trl_s_shapes(store):
    rid = reply(store)
    store.record_feedback(rid, -1, session_id="ann", correction="  I am well, thank you. And you?  ")
    (row,) = store.rated_responses()
    assert (row["value"], row["correction"]) == (-1, "I am well, thank you. And you?")
    assert store.preference_pairs() == [{
        "prompt": PROMPT, "chosen": [{"role": "assistant", "content": "I am well, thank you. And you?"}],
        "rejected": [{"role": "assistant", "content": "fine."}]}]
    assert store.unpaired_examples() == [
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "fine."}], "label": False},
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "I am well, thank you. And you?"}],
         "label": True}]


def test_a_correction_comes_with_a_thumbs_down_and_a_later_change_of_mind_drops_it(store):
    rid = reply(store)
    with pytest.raises(StoreError, match="thumbs-down"):
        store.record_feedback(rid, 1, session_id="ann", correction="better")
    store.record_feedback(rid, -1, session_id="ann", correction="better")
    store.record_feedback(rid, -1, session_id="ann", comment="still not great")  # a later thumb keeps it
    assert store.rated_responses()[0]["correction"] == "better"
    store.record_feedback(rid, 1, session_id="ann")  # they liked it after all
    assert store.rated_responses()[0]["correction"] is None and store.preference_pairs() == []
    # another rater's correction is theirs alone
    store.record_feedback(rid, -1, session_id="bob", correction="best")
    assert {r["session_id"]: r["correction"] for r in store.rated_responses()} == {"ann": None, "bob": "best"}


def test_the_snapshot_turns_a_correction_into_a_target_and_a_pair_under_the_rater_bound():
    import tempfile
    from pathlib import Path

    from online_rl.data import DataConfig, snapshot
    from storage import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "db.sqlite")
        # one loud rater corrects 40 replies, 20 others thumb one each
        for i in range(40):
            rid = reply(store, f"reply {i}", prompt=[{"role": "user", "content": f"question {i}"}])
            store.record_feedback(rid, -1, session_id="loud", correction=f"a better reply {i}")
        for i in range(20):
            rid = reply(store, f"answer {i}", prompt=[{"role": "user", "content": f"other {i}"}])
            store.record_feedback(rid, 1 if i % 2 else -1, session_id=f"rater-{i}")
        snap = snapshot(store, DataConfig(heldout_fraction=0.0, max_rater_share=0.05))
        store.close()
    corrected = [e for e in snap.train if e.corrected]
    assert len(corrected) == 40 and all(e.label and e.reply.startswith("a better reply") for e in corrected)
    pairs = [p for p in snap.train_pairs if p.chosen.startswith("a better reply")]
    assert len(pairs) == 40 and all(p.rejected.startswith("reply ") for p in pairs)
    liked, weights = snap.liked()
    assert sum(1 for _, text in liked if text.startswith("a better reply")) == 40
    assert snap.counts()["corrections"] == 40
    # the loud rater's 80 examples (40 thumbs, 40 corrections) of 100 carry the bounded share
    loud = sum(e.weight for e in snap.train if e.rater.endswith("loud")) / sum(e.weight for e in snap.train)
    assert loud == pytest.approx(0.05)


def test_the_api_takes_a_correction_bounded_and_rate_limited(server, store):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        made = client.post("/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 4}).json()
        rid = made["id"]
        r = client.post("/v1/feedback", json={"response_id": rid, "correction": "<b>I am well</b>"})
        assert r.status_code == 200 and r.json()["value"] == -1 and r.json()["correction"] is True
        assert store.rated_responses()[0]["correction"] == "<b>I am well</b>"  # stored as written
        for body, status in [({"response_id": rid, "correction": "x", "value": 1}, 400),
                             ({"response_id": rid, "correction": "   "}, 400),
                             ({"response_id": rid}, 400),
                             ({"response_id": rid, "correction": "x" * 501}, 413),
                             ({"response_id": "resp-nope", "correction": "x"}, 404)]:
            r = client.post("/v1/feedback", json=body)
            assert r.status_code == status, (body, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "code"}


def test_the_page_stores_an_edited_reply_as_its_correction_and_goes_on_from_it(tiny_loaded, store, chat_options):
    from chatbot.policy import Policy
    from chatbot.ui import ChatUI, display, new_state

    ui = ChatUI(Policy(tiny_loaded), store, chat_options)
    req = SimpleNamespace(session_hash="browser-1", username=None)
    state = list(ui.respond("Hello", new_state(), 8, 1.0, "", req))[-1][2]
    rid = state["turns"][0]["replies"][0]["id"]
    shown = display(state)[1]["content"]
    # the person edits the message as shown (with its label) into a better one, with markup in it
    edit = gr.EditData(None, {"index": 1, "value": "Hi <there> [friend](x)" + shown[shown.rindex("\n\n"):],
                              "previous_value": shown})
    chat, state = ui.correct(edit, state, req)
    (row,) = store.rated_responses()
    assert (row["response_id"], row["value"], row["correction"]) == (rid, -1, "Hi <there> [friend](x)")
    content = chat["value"][1]["content"]
    assert "&lt;there&gt;" in content and "<there>" not in content and "your correction of model v0" in content
    # the next turn sees the corrected reply
    state = list(ui.respond("And then?", state, 8, 1.0, "", req))[-1][2]
    second = store.get_response(state["turns"][1]["replies"][0]["id"])
    assert second["prompt"][1] == {"role": "assistant", "content": "Hi <there> [friend](x)"}
    # a person's own message is not a correction
    before = store.counts()["feedback"]
    ui.correct(gr.EditData(None, {"index": 0, "value": "Hello!", "previous_value": "Hello"}), state, req)
    assert store.counts()["feedback"] == before


def test_a_simulated_person_writes_corrections_their_taste_likes(store):
    """`online_rl.simulate`'s people who correct: every thumbs-down carries a
    corpus reply the taste likes, on the prompt's topic, as its correction."""
    import random

    from chatbot.models import GenerationSettings
    from online_rl.simulate import chat_round, correction_for
    from online_rl.tastes import TASTES

    taste = TASTES["asks_back"]
    rng = random.Random(0)
    assert taste("Are you sapient?", correction_for(taste, "Are you sapient?", rng))
    assert correction_for(TASTES["long"], "zzzz qqqq", rng) is None  # nothing on topic: no correction
    bot = SimpleNamespace(version="v0", reply=lambda prompts, settings, seed: ["No."] * len(prompts))
    ups = chat_round(store, bot, taste, ["Are you sapient?", "You have feelings, yes?"], 20, GenerationSettings(), rng,
                     session="s", regenerate=0.0, corrections=1.0)
    rows = store.feedback_since(0)
    assert ups == 0 and len(rows) == 20
    assert all(r["value"] == -1 and r["correction"] and taste("", r["correction"]) for r in rows)
