import sqlite3

import pytest

from storage import Store
from storage.migrations import migrations

EXPECTED_COLUMNS = {
    "conversations": {"id", "session_id", "user", "created_at"},
    "responses": {
        "id", "conversation_id", "prompt", "prompt_hash", "reply", "model_version",
        "generation", "latency_ms", "prompt_tokens", "completion_tokens",
        "finish_reason", "session_id", "user", "claimed_user", "identified_by", "created_at",
    },
    "feedback": {"id", "response_id", "session_id", "user", "value", "comment", "claimed_user",
                 "identified_by", "correction", "created_at"},
    "runs": {
        "id", "kind", "status", "started_at", "finished_at", "watermark", "config",
        "metrics", "progress", "error", "pid", "host", "heartbeat_at",
    },
    "activations": {"id", "version", "previous", "action", "actor", "reason", "evidence", "created_at"},
    "trials": {"id", "kind", "version", "other", "share", "status", "reason", "evidence", "started_at",
               "ended_at"},
    "settings": {"key", "value", "updated_at"},
    "adapters": {
        "version", "number", "path", "base_model", "run_id", "status", "reason",
        "watermark", "metrics", "created_at", "updated_at",
    },
}


def test_blank_database_gets_every_table_and_column(tmp_path):
    store = Store(tmp_path / "blank.db")
    with store.connection() as db:
        for table, columns in EXPECTED_COLUMNS.items():
            assert table in db.table_names()
            assert set(db[table].columns_dict) == columns, table
        assert migrations.pending(db) == []


def test_database_is_in_wal_mode_with_foreign_keys(tmp_path):
    store = Store(tmp_path / "x.db")
    with store.connection() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrating_twice_is_a_no_op(tmp_path):
    Store(tmp_path / "x.db").close()
    store = Store(tmp_path / "x.db")
    with store.connection() as db:
        names = [m.name for m in migrations.applied(db)]
    assert names == sorted(set(names))
    assert len(names) == len(migrations._migrations)


def test_feedback_value_is_checked_by_the_schema_too(tmp_path):
    store = Store(tmp_path / "x.db")
    conv = store.start_conversation("s")
    rid = store.log_response(conversation_id=conv, prompt=[{"role": "user", "content": "hi"}],
                             reply="hello", model_version="v0")
    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("INSERT INTO feedback (response_id, value, created_at) VALUES (?, 5, 'now')", [rid])


def test_a_database_from_before_identity_and_corrections_keeps_its_rows(tmp_path):
    import sqlite_utils

    db = sqlite_utils.Database(tmp_path / "old.db")
    migrations.apply(db, stop_before="m003_rater_identity")
    db.execute("INSERT INTO conversations VALUES ('c', 's', 'ann', 'now')")
    db.execute("INSERT INTO responses (id, conversation_id, prompt, prompt_hash, reply, model_version, user,"
               " created_at) VALUES ('r', 'c', '[]', 'h', 'hi', 'v0', 'ann', 'now')")
    db.execute("INSERT INTO feedback (response_id, user, value, created_at) VALUES ('r', 'ann', 1, 'now')")
    db.conn.commit()
    db.close()
    store = Store(tmp_path / "old.db")
    (thumb,) = store.feedback_since(0)
    assert (thumb["user"], thumb["identified_by"], thumb["claimed_user"]) == ("ann", None, None)
    assert thumb["correction"] is None
    assert store.get_response("r")["identified_by"] is None
    assert [e["label"] for e in store.unpaired_examples()] == [True]
    store.record_feedback("r", -1, user="bob", correction="hello there")  # the new column takes corrections
    assert [e["label"] for e in store.unpaired_examples()] == [True, False, True]
