"""Live trials: the sequential test, the canary (serving and deciding), the
watch after a promotion, and the store's record of every decision."""

from __future__ import annotations

import random

import httpx
import pytest

from chatbot.live_trials import LiveJudge, TrialSettings
from online_rl.sequential import NOT_WORSE, UNDECIDED, WORSE, compare, confidence_sequence
from conftest import PROMPTS


def _thumbs(rng, p, n):
    return [1 if rng.random() < p else 0 for _ in range(n)]


# -- the sequential test -------------------------------------------------------


def test_confidence_sequence_narrows_and_keeps_the_mean():
    rng = random.Random(0)
    values = _thumbs(rng, 0.7, 2000)
    widths = []
    for n in (20, 100, 500, 2000):
        interval = confidence_sequence(values[:n], 0.05)
        assert interval.low <= 0.7 <= interval.high
        widths.append(interval.high - interval.low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.1
    assert confidence_sequence([], 0.05).low == 0.0 and confidence_sequence([], 0.05).high == 1.0
    with pytest.raises(ValueError):
        confidence_sequence([2], 0.05)


def test_the_error_rate_holds_however_often_it_is_looked_at():
    """Equal arms are almost never called worse, and an arm 0.2 worse almost
    never called not worse, over 400 thumbs each looked at after every one
    (each arm's interval is a running intersection, so the last look is
    "ever": had any earlier look decided, the last one would too)."""
    rng = random.Random(1)
    runs = 300
    false_worse = sum(compare(_thumbs(rng, 0.5, 400), _thumbs(rng, 0.5, 400), margin=0.0)["verdict"] == WORSE
                      for _ in range(runs))
    false_fine = sum(compare(_thumbs(rng, 0.4, 400), _thumbs(rng, 0.6, 400), margin=0.05)["verdict"] == NOT_WORSE
                     for _ in range(runs))
    assert false_worse / runs <= 0.05 and false_fine / runs <= 0.05


def test_clear_cases_are_decided_and_thin_evidence_is_not():
    rng = random.Random(2)
    assert compare(_thumbs(rng, 0.9, 150), _thumbs(rng, 0.5, 600))["verdict"] == NOT_WORSE
    assert compare(_thumbs(rng, 0.1, 150), _thumbs(rng, 0.6, 600))["verdict"] == WORSE
    thin = compare([1, 0, 1], [1, 1, 0, 1])
    assert thin["verdict"] == UNDECIDED and thin["difference"]["low"] < 0 < thin["difference"]["high"]


# -- deciding on the store's thumbs --------------------------------------------


def _adapter(store, tmp_path, version):
    path = tmp_path / "adapters" / version
    path.mkdir(parents=True, exist_ok=True)
    store.register_adapter(version, path=str(path), base_model="tiny")


def _rated(store, version, values, rater="r"):
    conversation = store.start_conversation("s")
    for i, value in enumerate(values):
        rid = store.log_response(conversation_id=conversation, prompt=[{"role": "user", "content": f"q{i}"}],
                                 reply="a", model_version=version)
        store.record_feedback(rid, 1 if value else -1, user=f"{rater}{i % 40}")


def _judge(store, **settings):
    return LiveJudge(store, lambda version, row: None, TrialSettings(**settings))


def test_a_better_canary_is_promoted_with_its_evidence(store, tmp_path):
    rng = random.Random(3)
    for v in ("v1", "v2"):
        _adapter(store, tmp_path, v)
    store.promote("v1")
    trial = store.start_canary("v2", 0.1, reason="passed the gate")
    assert store.get_adapter("v2")["status"] == "candidate"
    assert _judge(store).look() == []  # no thumbs yet: undecided
    _rated(store, "v1", _thumbs(rng, 0.4, 600))
    _rated(store, "v2", _thumbs(rng, 0.9, 120))
    (decision,) = _judge(store).look()
    assert decision["verdict"] == NOT_WORSE and store.active_version() == "v2"
    row = store.activations()[0]
    assert (row["action"], row["actor"], row["version"], row["previous"]) == ("canary", "canary", "v2", "v1")
    assert row["evidence"]["new"]["thumbs"] == 120 and row["evidence"]["other"]["thumbs"] == 600
    assert store.trial(trial["id"])["status"] == "promoted"
    (watch,) = store.running_trials()  # every promotion is watched
    assert (watch["kind"], watch["version"], watch["other"]) == ("watch", "v2", "v1")


def test_a_worse_canary_is_rejected_and_the_decision_is_logged(store, tmp_path):
    rng = random.Random(4)
    for v in ("v1", "v2"):
        _adapter(store, tmp_path, v)
    store.promote("v1")
    trial = store.start_canary("v2", 0.1)
    _rated(store, "v1", _thumbs(rng, 0.7, 400))
    _rated(store, "v2", _thumbs(rng, 0.1, 60))
    (decision,) = _judge(store).look()
    assert decision["verdict"] == WORSE and store.active_version() == "v1"
    assert store.get_adapter("v2")["status"] == "rejected"
    assert "worse than v1 on live thumbs" in store.get_adapter("v2")["reason"]
    row = store.activations()[0]
    assert (row["action"], row["version"], row["previous"]) == ("canary_reject", "v2", "v1")
    assert row["evidence"]["verdict"] == WORSE
    assert store.trial(trial["id"])["status"] == "rejected" and store.running_canary() is None
    # The rejection is no activation: rollback still goes back to what was before v1.
    assert store.rollback_target() == "v0"


def test_the_watch_rolls_back_a_promotion_that_people_like_less(store, tmp_path):
    rng = random.Random(5)
    for v in ("v1", "v2"):
        _adapter(store, tmp_path, v)
    store.promote("v1")
    _rated(store, "v1", _thumbs(rng, 0.8, 500))
    store.promote("v2", actor="operator")
    _rated(store, "v2", _thumbs(rng, 0.2, 20))
    assert _judge(store).look() == []  # 20 thumbs: not yet significant
    watch = store.running_trials()[0]
    assert watch["evidence"]["new"]["thumbs"] == 20
    _rated(store, "v2", _thumbs(rng, 0.2, 60))
    assert _judge(store, watch=False).look() == []  # switched off: no decision
    (decision,) = _judge(store).look()
    assert decision["verdict"] == WORSE and store.active_version() == "v1"
    row = store.activations()[0]
    assert (row["action"], row["actor"], row["version"]) == ("rollback", "watch", "v1")
    assert row["evidence"]["difference"]["high"] < 0
    assert store.trial(watch["id"])["status"] == "rolled_back"
    assert store.running_trials() == []  # a rollback starts no watch of its own


def test_a_watch_passes_when_the_new_version_is_not_worse(store, tmp_path):
    rng = random.Random(6)
    for v in ("v1", "v2"):
        _adapter(store, tmp_path, v)
    store.promote("v1")
    _rated(store, "v1", _thumbs(rng, 0.5, 800))
    store.promote("v2")
    _rated(store, "v2", _thumbs(rng, 0.85, 300))
    (decision,) = _judge(store).look()
    assert decision["verdict"] == NOT_WORSE and store.active_version() == "v2"
    assert store.trials(1)[0]["status"] == "passed"


def test_a_new_canary_or_another_promotion_supersedes_a_running_one(store, tmp_path):
    for v in ("v1", "v2", "v3"):
        _adapter(store, tmp_path, v)
    first = store.start_canary("v1", 0.2)
    second = store.start_canary("v2", 0.2)
    assert store.trial(first["id"])["status"] == "superseded"
    assert "superseded by v2" in store.get_adapter("v1")["reason"]
    store.promote("v3")
    assert store.trial(second["id"])["status"] == "superseded"
    assert [t["kind"] for t in store.running_trials()] == ["watch"]
    with pytest.raises(Exception, match="active version already"):
        store.start_canary("v3", 0.1)


def test_the_gate_puts_a_passing_candidate_on_canary_instead_of_live(store, tmp_path):
    from online_rl.gate import apply

    _adapter(store, tmp_path, "v1")
    good = {"active_version": "v0", "prompts": 8, "win_rate": 0.8, "judge_win_rate": 0.8,
            "judge_informative": True, "kl_per_token": 0.05, "candidate": {"distinct_fraction": 1.0,
                                                                            "top_reply_share": 0.1}}
    verdict = apply(store, "v1", good, canary=0.1)
    assert verdict.passed, verdict.reasons
    assert store.active_version() == "v0" and store.get_adapter("v1")["status"] == "candidate"
    canary = store.running_canary()
    assert (canary["version"], canary["other"], canary["share"]) == ("v1", "v0", 0.1)


def test_a_database_from_before_live_trials_keeps_its_activations(tmp_path):
    import sqlite_utils

    from storage import Store
    from storage.migrations import migrations

    db = sqlite_utils.Database(tmp_path / "old.db")
    migrations.apply(db, stop_before="m005_live_trials")
    db.execute("INSERT INTO activations (version, previous, action, actor, reason, created_at)"
               " VALUES ('v0', 'v0', 'promote', 'me', 'x', 'then')")
    db.conn.commit()
    db.close()
    store = Store(tmp_path / "old.db")
    (row,) = store.activations()
    assert (row["action"], row["actor"], row["evidence"]) == ("promote", "me", None)
    assert store.running_trials() == []


# -- serving two arms ----------------------------------------------------------


def test_canary_arm_is_sticky_and_each_reply_names_its_writer(tiny_trained, adapters, expected):
    from chatbot.models import GenerationSettings, load_model
    from chatbot.policy import Policy, Route

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    policy.swap_to("v1", str(adapters["v1"]))
    policy.start_canary(7, "v2", str(adapters["v2"]), 0.5)
    greedy = GenerationSettings(temperature=0, max_new_tokens=12)
    arms = {}
    for i in range(24):
        prompt = PROMPTS[i % len(PROMPTS)]
        first = policy.generate([{"role": "user", "content": prompt}], greedy, route=Route(key=f"user:{i}"))
        again = policy.generate([{"role": "user", "content": prompt}], greedy, route=Route(key=f"user:{i}"))
        assert first.version == again.version, "the same key stays on its arm"
        assert first.text == expected[first.version][prompt], "the label names the adapter that wrote it"
        arms[i] = first.version
    assert set(arms.values()) == {"v1", "v2"}
    for pinned, served in (("v2", "v2"), ("v1", "v1"), ("v0", "v1")):  # a conversation keeps its arm
        reply = policy.generate([{"role": "user", "content": "hello"}], greedy, route=Route(pinned=pinned))
        assert (reply.version, reply.text) == (served, expected[served]["hello"])
    assert policy.generate([{"role": "user", "content": "hello"}], greedy).version == "v1"  # no route: serving
    assert len(policy.loaded_versions()) == 2
    canary_adapter = policy.canary.adapter
    policy.swap_to("v2", str(adapters["v2"]))  # promoted: the canary's adapter serves everyone
    assert policy.loaded_versions() == ["v2"] and policy._adapter == canary_adapter and policy.canary is None
    reply = policy.generate([{"role": "user", "content": "hello"}], greedy, route=Route(key="user:x"))
    assert (reply.version, reply.text) == ("v2", expected["v2"]["hello"])
    policy.start_canary(8, "v1", str(adapters["v1"]), 0.3)
    policy.end_canary()
    assert policy.loaded_versions() == ["v2"] and policy._adapter == canary_adapter


def test_a_page_conversation_stays_on_the_version_it_started_on():
    from chatbot.ui import new_state, route_of

    state = new_state()
    assert route_of(state).pinned is None and route_of(state).key is None  # a new conversation draws
    state["turns"] = [{"user": "hi", "replies": [{"id": "r1", "text": "a", "version": "v7"}], "shown": 0},
                      {"user": "and?", "replies": [{"id": "r2", "text": "b", "version": "v6"}], "shown": 0}]
    assert route_of(state).pinned == "v7"


def test_a_server_serves_the_canary_the_store_names_to_its_share_of_callers(tiny_trained, store, chat_options,
                                                                             adapters, expected):
    from chatbot.server import BackgroundServer, build_serving

    for version, path in adapters.items():
        store.register_adapter(version, path=str(path), base_model=str(tiny_trained))
    store.promote("v1")
    from chatbot.models import load_model

    serving = build_serving(store, load_model(str(tiny_trained), tiny_trained, device="cpu"), None, chat_options)
    store.start_canary("v2", 0.3)
    serving.follower.sync()
    assert serving.policy.canary.version == "v2"
    seen = {}
    with BackgroundServer(serving.app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(30):
            for _ in range(2):
                body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 12,
                        "user": f"caller-{i}"}
                data = client.post("/v1/chat/completions", json=body).json()
                version = data["model"]
                assert data["choices"][0]["message"]["content"] == expected[version]["hello"]
                assert seen.setdefault(i, version) == version, "each caller stays on its arm"
        on_canary = sum(v == "v2" for v in seen.values())
        assert 0 < on_canary < 30
        logged = {r["model_version"] for r in store._query("SELECT model_version FROM responses")}
        assert logged == {"v1", "v2"}
        # Rejected: the canary stops serving at the next sync.
        trial = store.running_canary()
        store.reject_canary(trial["id"], reason="worse", evidence={})
        serving.follower.sync()
        assert serving.policy.canary is None
        data = client.post("/v1/chat/completions", json={**body, "user": "caller-0"}).json()
        assert data["model"] == "v1"


def test_on_the_page_a_conversation_keeps_the_arm_it_started_on(tiny_trained, adapters, store, chat_options):
    """Through the chat page's handlers: a conversation begun before the
    canary stays on the serving version, a new one draws its arm (here a
    share of all but one in a million), and keeps it while the canary runs."""
    from types import SimpleNamespace

    from chatbot.models import load_model
    from chatbot.policy import Policy
    from chatbot.ui import ChatUI, new_state

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"))
    policy.swap_to("v1", str(adapters["v1"]))
    ui = ChatUI(policy, store, chat_options)
    request = SimpleNamespace(session_hash="browser-1", username=None)

    def say(text, state):
        return list(ui.respond(text, state, 8, 0.0, "", request))[-1][2]

    def versions(state):
        return [reply["version"] for turn in state["turns"] for reply in turn["replies"]]

    earlier = say("hello", new_state())
    policy.start_canary(1, "v2", str(adapters["v2"]), 0.999999)
    earlier = say("how are you", earlier)
    fresh = say("how are you", say("hello", new_state()))
    assert versions(earlier) == ["v1", "v1"] and versions(fresh) == ["v2", "v2"]
    logged = [store.get_response(reply["id"])["model_version"] for turn in fresh["turns"] for reply in turn["replies"]]
    assert logged == ["v2", "v2"]
    policy.end_canary()  # rejected: its conversations go on with the serving version
    assert versions(say("what is your name", fresh)) == ["v2", "v2", "v1"]
