"""The domain-level store: every reply, thumb, run and adapter goes through here.

One `Store` speaks for three parts, each in a module of its own: the
feedback log (`storage.feedback`), the run log (`storage.runs`) and the
adapter registry (`storage.registry`); the rule that makes preference pairs
and the rows in TRL's shapes live in `storage.shapes`.

Threading model: one SQLite file in WAL mode, a bounded pool of connections
(`storage.connections`) that every thread borrows from for the length of one
store call, short write transactions started with ``BEGIN IMMEDIATE`` so that
concurrent writers queue on the busy timeout instead of failing on a lock
upgrade.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from storage.common import (
    BASE_VERSION, BUSY_TIMEOUT_S, DB_FILENAME, ResponseNotFound, RunInProgress, StoreError, prompt_hash, utcnow)
from storage.connections import ConnectionPool
from storage.feedback import FeedbackLog, new_response_id
from storage.migrations import migrations
from storage.registry import Registry
from storage.runs import RunLog, run_summary
from storage.trials import Trials

__all__ = ["BASE_VERSION", "BUSY_TIMEOUT_S", "DB_FILENAME", "ResponseNotFound", "RunInProgress", "Store", "StoreError",
           "new_response_id", "prompt_hash", "run_summary", "utcnow"]

class Store(FeedbackLog, RunLog, Registry, Trials):
    """Speaks the domain: conversations, responses, feedback, runs, adapters.

    Build it with the path of the database file, or with `Store.in_data_dir`.
    The schema is migrated when the store is built.
    """

    def __init__(self, path: str | os.PathLike, *, connections: int = 8):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ConnectionPool(self.path, size=connections, busy_timeout_s=BUSY_TIMEOUT_S)
        self.migrate()

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike) -> "Store":
        return cls(Path(data_dir) / DB_FILENAME)

    # -- connections -----------------------------------------------------

    def connection(self) -> contextlib.AbstractContextManager[sqlite_utils.Database]:
        """A borrowed connection (a `sqlite_utils.Database`) for the length of
        a ``with`` block: for a few reads together, or a look from outside."""
        return self._pool.connection()

    def _query(self, sql: str, params=None) -> list[dict]:
        """The rows of one query, read whole before the connection goes back."""
        with self._pool.connection() as db:
            return list(db.query(sql, params or []))

    def open_connections(self) -> int:
        return self._pool.open_count()

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """A short write transaction. Nested calls become savepoints."""
        with self._pool.connection() as db:
            if db.conn.in_transaction:
                with db.atomic():
                    yield db
                return
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.conn.rollback()
                raise
            else:
                db.conn.commit()

    def transaction(self) -> contextlib.AbstractContextManager:
        """Group several store calls into one commit: all of them or none.

        ``with store.transaction(): ...`` around e.g. `start_conversation` and
        `log_response`; the calls inside become savepoints of one write.
        """
        return self._write()

    def migrate(self) -> None:
        # Two processes may start on a blank data dir at once: hold the write
        # lock while migrating so that the second one waits, then finds
        # nothing pending.
        with self._write() as db:
            migrations.apply(db)

    # -- summary --------------------------------------------------------------

    def counts(self) -> dict:
        with self.connection() as db:
            return self._counts(db)

    @staticmethod
    def _counts(db) -> dict:
        one = lambda sql: next(db.query(sql))["n"]  # noqa: E731
        runs_by_status = {
            r["status"]: r["n"]
            for r in db.query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        }
        feedback_by_value = {
            {1: "up", -1: "down", 0: "withdrawn"}[r["value"]]: r["n"]
            for r in db.query("SELECT value, COUNT(*) AS n FROM feedback GROUP BY value")
        }
        return {
            "conversations": one("SELECT COUNT(*) AS n FROM conversations"),
            "responses": one("SELECT COUNT(*) AS n FROM responses"),
            "feedback": one("SELECT COUNT(*) AS n FROM feedback"),
            "feedback_by_value": feedback_by_value,
            "runs": one("SELECT COUNT(*) AS n FROM runs"),
            "runs_by_status": runs_by_status,
            "adapters": one("SELECT COUNT(*) AS n FROM adapters"),
        }

    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = (self._query("SELECT value FROM settings WHERE key = ?", [key]))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                [key, json.dumps(value), utcnow()],
            )

    def status(self, recent_runs: int = 5) -> dict:
        """What `app.py status` prints: the active version, the registry,
        counts, the schedule's state and the most recent runs."""
        self.fail_stale_runs()
        watermark = self.latest_feedback_id()
        return {
            "active_version": self.active_version(),
            **self.counts(),
            "feedback_watermark": watermark,
            "new_feedback_since_last_run": watermark - self.last_run_watermark(),
            "schedule_paused": bool(self.get_setting("schedule_paused", False)),
            "adapters_by_version": [
                {"version": a["version"], "status": a["status"], "reason": a["reason"], "run_id": a["run_id"],
                 "created_at": a["created_at"]}
                for a in self.adapters()
            ],
            "recent_runs": [run_summary(r) for r in self.runs(recent_runs)],
            "rater_shares": self.last_rater_shares(),
            "live_trials": self.trials(5),
            "database": str(self.path),
        }
