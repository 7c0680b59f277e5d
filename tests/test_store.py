import json

import pytest

from storage import ResponseNotFound, StoreError

HELLO = [{"role": "user", "content": "Hello"}]


def _reply(store, text, prompt=HELLO, conversation=None, version="v0"):
    conversation = conversation or store.start_conversation("sess-1")
    return store.log_response(conversation_id=conversation, prompt=prompt, reply=text,
                              model_version=version, generation={"temperature": 1.0},
                              latency_ms=12.5, session_id="sess-1")


def test_logged_response_keeps_prompt_settings_and_version(store):
    rid = _reply(store, "Hi there", version="v3")
    row = store.get_response(rid)
    assert row["prompt"] == HELLO
    assert row["reply"] == "Hi there"
    assert row["model_version"] == "v3"
    assert row["generation"] == {"temperature": 1.0}
    assert row["latency_ms"] == 12.5


def test_changed_mind_is_a_new_row_and_the_latest_counts(store):
    rid = _reply(store, "Hi")
    first = store.record_feedback(rid, 1, session_id="sess-1")
    second = store.record_feedback(rid, -1, session_id="sess-1", comment="  too short ")
    assert second > first
    rows = store.feedback_since(0)
    assert [r["value"] for r in rows] == [1, -1]
    assert rows[1]["comment"] == "too short"
    examples = store.unpaired_examples()
    assert len(examples) == 1 and examples[0]["label"] is False
    assert store.votes_for([rid], session_id="sess-1") == {rid: -1}


def test_a_withdrawn_vote_drops_the_example(store):
    rid = _reply(store, "Hi")
    store.record_feedback(rid, 1, session_id="sess-1")
    store.record_feedback(rid, 0, session_id="sess-1")
    assert store.unpaired_examples() == []


def test_each_rater_counts_once(store):
    rid = _reply(store, "Hi")
    store.record_feedback(rid, 1, user="ann")
    store.record_feedback(rid, -1, user="bob")
    store.record_feedback(rid, 1, user="bob")
    assert [e["label"] for e in store.unpaired_examples()] == [True, True]


def test_unknown_response_and_bad_value_are_refused(store):
    with pytest.raises(ResponseNotFound, match="no-such-id"):
        store.record_feedback("no-such-id", 1)
    rid = _reply(store, "Hi")
    for bad in (2, -2, True, "1", 0.5):
        with pytest.raises(StoreError):
            store.record_feedback(rid, bad)
    assert store.feedback_since(0) == []


def test_regenerated_replies_with_opposite_thumbs_make_a_pair(store):
    conv = store.start_conversation("sess-1")
    good = _reply(store, "Hi! How are you?", conversation=conv)
    bad = _reply(store, "Go away.", conversation=conv)
    other = _reply(store, "Fine.", prompt=[{"role": "user", "content": "How are you?"}], conversation=conv)
    store.record_feedback(good, 1, session_id="sess-1")
    store.record_feedback(bad, -1, session_id="sess-1")
    store.record_feedback(other, -1, session_id="sess-1")
    pairs = store.preference_pairs()
    assert pairs == [{
        "prompt": HELLO,
        "chosen": [{"role": "assistant", "content": "Hi! How are you?"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }]


def test_export_round_trips_in_trl_shapes(store, tmp_path):
    good, bad = _reply(store, "Hello!"), _reply(store, "No.")
    store.record_feedback(good, 1, session_id="s")
    store.record_feedback(bad, -1, session_id="s")
    assert store.export_jsonl(tmp_path / "u.jsonl", "unpaired") == 2
    assert store.export_jsonl(tmp_path / "p.jsonl", "paired") == 1
    unpaired = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert unpaired == store.unpaired_examples()
    assert set(unpaired[0]) == {"prompt", "completion", "label"}
    paired = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert paired == store.preference_pairs()
    assert set(paired[0]) == {"prompt", "chosen", "rejected"}
    # The unpaired rows load as a datasets.Dataset, which is what TRL's trainers take.
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(tmp_path / "u.jsonl"), split="train")
    assert ds.column_names == ["prompt", "completion", "label"] and len(ds) == 2


def test_export_refuses_an_unknown_shape(store, tmp_path):
    with pytest.raises(StoreError, match="unknown export shape"):
        store.export_jsonl(tmp_path / "x.jsonl", "triplets")
    assert not (tmp_path / "x.jsonl").exists()


def test_watermark_limits_what_a_run_sees(store):
    a, b = _reply(store, "A"), _reply(store, "B")
    first = store.record_feedback(a, 1, session_id="s")
    store.record_feedback(b, -1, session_id="s")
    assert len(store.unpaired_examples(watermark=first)) == 1
    assert [r["id"] for r in store.feedback_since(first)] == [first + 1]
    assert store.latest_feedback_id() == first + 1


def test_runs_record_status_metrics_and_errors(store):
    run = store.start_run("retrain-ppo", config={"lr": 1e-4}, watermark=7)
    assert store.get_run(run)["status"] == "running"
    store.update_run_progress(run, {"stage": "ppo", "step": 3})
    store.finish_run(run, "failed", error="ValueError: boom")
    row = store.get_run(run)
    assert row["status"] == "failed" and row["error"] == "ValueError: boom"
    assert row["config"] == {"lr": 1e-4} and row["progress"]["step"] == 3
    assert row["finished_at"] is not None
    with pytest.raises(StoreError):
        store.finish_run(run, "running")


def test_adapter_versions_are_never_reused_and_one_is_active(store, tmp_path):
    assert store.active_version() == "v0"
    v1 = store.allocate_version()
    store.register_adapter(v1, path=str(tmp_path), base_model="starter")
    store.promote(v1)
    v2 = store.allocate_version()
    store.register_adapter(v2, path=str(tmp_path), base_model="starter")
    assert (v1, v2) == ("v1", "v2")
    store.promote(v2)
    assert store.active_version() == "v2"
    assert store.get_adapter("v1")["status"] == "retired"
    store.set_adapter_status(v2, "rejected", reason="worse")
    assert store.active_version() == "v0"
    assert store.allocate_version() == "v3"
    store.promote("v0")
    assert store.active_version() == "v0"
    with pytest.raises(StoreError):
        store.register_adapter("v0", path="/x", base_model="starter")


def test_promote_is_the_only_way_a_version_becomes_active_and_every_change_is_logged(store, tmp_path):
    store.register_adapter("v1", path=str(tmp_path), base_model="starter")
    with pytest.raises(StoreError, match="promote"):
        store.set_adapter_status("v1", "active")
    with pytest.raises(StoreError, match="promote"):
        store.register_adapter("v2", path="/a/v2", base_model="starter", status="active")
    assert store.active_version() == "v0" and store.activations() == []
    store.promote("v1", actor="test", reason="why not")
    store.rollback(actor="test")
    assert [(a["version"], a["previous"], a["action"]) for a in store.activations()][::-1] == [
        ("v1", "v0", "promote"), ("v0", "v1", "rollback")]


def test_status_on_a_blank_store(store):
    status = store.status()
    assert status["active_version"] == "v0"
    assert (status["conversations"], status["responses"], status["feedback"], status["runs"]) == (0, 0, 0, 0)


def test_a_transaction_commits_all_of_its_calls_or_none(store):
    with store.transaction():
        rid = _reply(store, "kept")
    assert store.get_response(rid)["reply"] == "kept"
    before = store.counts()
    with pytest.raises(RuntimeError):
        with store.transaction():
            _reply(store, "lost")  # a conversation and a response
            raise RuntimeError("crash between the writes")
    assert store.counts() == before


def test_a_thousand_short_lived_threads_leave_open_files_where_they_were(store):
    """Every thread that writes through the Store borrows a pooled connection
    and gives it back: open files and connections do not grow with threads."""
    import os
    import threading

    conversation = store.start_conversation("s")
    response = store.log_response(conversation_id=conversation, prompt=[{"role": "user", "content": "hi"}],
                                  reply="hello", model_version="v0", session_id="s")
    store.record_feedback(response, 1, session_id="s")  # warm-up: the pool's first connection

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    errors = []

    def thumb(i: int) -> None:
        try:
            store.record_feedback(response, 1 if i % 2 else -1, session_id=f"t{i}")
            store.counts()
        except Exception as exc:  # noqa: BLE001 - counted below
            errors.append(exc)

    for start in range(0, 1000, 50):  # 50 at a time, 1,000 threads in all
        threads = [threading.Thread(target=thumb, args=(i,)) for i in range(start, start + 50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert store.counts()["feedback"] == 1001
    # The pool's connections were all open before the threads came, and no more.
    assert store.open_connections() == 8
    assert open_files() == before


def test_the_pool_opens_its_connections_once_and_lends_each_to_one_thread_at_a_time(tmp_path):
    import threading
    import time

    from storage.connections import ConnectionPool

    pool = ConnectionPool(tmp_path / "p.db", size=3)
    assert pool.open_count() == 0  # nothing opened before the first use
    held, release = [], threading.Event()

    def hold() -> None:
        with pool.connection() as db:
            held.append(db.conn)
            release.wait(timeout=10)

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(held) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len({id(c) for c in held}) == 3  # three threads, three different connections
    assert pool.open_count() == 3
    release.set()
    for t in threads:
        t.join()
    for _ in range(20):
        with pool.connection() as db:
            assert db.conn in held  # reused, never a fourth
    assert pool.open_count() == 3
    pool.close()
    assert pool.open_count() == 0
