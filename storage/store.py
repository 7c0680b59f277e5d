"""The domain-level store: every reply, thumb, run and adapter goes through here.

Threading model: one SQLite file in WAL mode, a bounded pool of connections
(`storage.connections`) that every thread borrows from for the length of one
store call, short write transactions started with ``BEGIN IMMEDIATE`` so that
concurrent writers queue on the busy timeout instead of failing on a lock
upgrade.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlite_utils

from storage.connections import ConnectionPool
from storage.migrations import migrations

DB_FILENAME = "chatbot.db"
BUSY_TIMEOUT_S = 30.0
BASE_VERSION = "v0"
ADAPTER_STATUSES = ("candidate", "active", "retired", "rejected")
RUN_STATUSES = ("running", "succeeded", "failed", "refused")
# fallback: a serving process started on a version that failed to load and
# came up on the last one that loads instead.
ACTIVATION_ACTIONS = ("promote", "gate", "rollback", "fallback")
HOST = socket.gethostname()
# A run on another machine that has not reported for this long is presumed dead.
STALE_HEARTBEAT_S = 1800


class StoreError(Exception):
    """A request the store cannot honour; the message says why."""


class RunInProgress(StoreError):
    """Another retrain is still running."""


class ResponseNotFound(StoreError):
    """Feedback named a response id that was never logged."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def prompt_hash(messages: list[dict]) -> str:
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


def _dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, ensure_ascii=False, sort_keys=True)


class Store:
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

    # -- conversations and responses --------------------------------------

    def start_conversation(
        self, session_id: str | None = None, user: str | None = None
    ) -> str:
        conversation_id = uuid.uuid4().hex
        with self._write() as db:
            db.execute(
                "INSERT INTO conversations (id, session_id, user, created_at) "
                "VALUES (?, ?, ?, ?)",
                [conversation_id, session_id, user, utcnow()],
            )
        return conversation_id

    def log_response(
        self,
        *,
        conversation_id: str,
        prompt: list[dict],
        reply: str,
        model_version: str,
        generation: dict | None = None,
        latency_ms: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
        session_id: str | None = None,
        user: str | None = None,
        response_id: str | None = None,
        claimed_user: str | None = None,
        identified_by: str | None = None,
    ) -> str:
        """Store one generated reply and return its id (made here if not given).

        The rater is `user`, else `session_id`; `identified_by` says how the
        server knew them, `claimed_user` is the name an API client sent (the
        rater only when `identified_by` is ``claimed``)."""
        response_id = response_id or new_response_id()
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        with self._write() as db:
            db.execute(
                "INSERT INTO responses (id, conversation_id, prompt, prompt_hash, reply,"
                " model_version, generation, latency_ms, prompt_tokens,"
                " completion_tokens, finish_reason, session_id, user, claimed_user, identified_by, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    response_id,
                    conversation_id,
                    json.dumps(messages, ensure_ascii=False),
                    prompt_hash(messages),
                    reply,
                    model_version,
                    _dumps(generation),
                    latency_ms,
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                    session_id,
                    user,
                    claimed_user,
                    identified_by,
                    utcnow(),
                ],
            )
        return response_id

    def get_response(self, response_id: str) -> dict | None:
        rows = (self._query("SELECT * FROM responses WHERE id = ?", [response_id]))
        if not rows:
            return None
        row = rows[0]
        row["prompt"] = json.loads(row["prompt"])
        row["generation"] = _loads(row["generation"])
        return row

    # -- feedback ---------------------------------------------------------

    def record_feedback(
        self,
        response_id: str,
        value: int,
        *,
        session_id: str | None = None,
        user: str | None = None,
        comment: str | None = None,
        claimed_user: str | None = None,
        identified_by: str | None = None,
    ) -> int:
        """Append one thumb (+1, -1, or 0 for a vote taken back); return its id.

        A changed mind is a new row: nothing is overwritten, the latest counts.
        The rater is `user`, else `session_id` (`log_response` says the rest).
        """
        if isinstance(value, bool) or value not in (-1, 0, 1):
            raise StoreError(f"feedback value must be 1, -1 or 0, not {value!r}")
        if comment is not None:
            comment = comment.strip() or None
        try:
            with self._write() as db:
                cursor = db.execute(
                    "INSERT INTO feedback (response_id, session_id, user, value,"
                    " comment, claimed_user, identified_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [response_id, session_id, user, int(value), comment, claimed_user, identified_by, utcnow()],
                )
                return cursor.lastrowid
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise ResponseNotFound(f"no response with id {response_id!r}") from None
            raise

    def feedback_since(self, watermark: int = 0, limit: int | None = None) -> list[dict]:
        """Feedback rows with id greater than `watermark`, oldest first."""
        sql = "SELECT * FROM feedback WHERE id > ? ORDER BY id"
        params: list[Any] = [watermark]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return (self._query(sql, params))

    def latest_feedback_id(self) -> int:
        row = self._query("SELECT COALESCE(MAX(id), 0) AS m FROM feedback")[0]
        return row["m"]

    def votes_for(self, response_ids: Iterable[str], *, session_id=None, user=None) -> dict:
        """The latest value per response given by one rater (user, else session)."""
        ids = list(response_ids)
        if not ids:
            return {}
        rater_sql, rater = _rater_clause(session_id, user)
        placeholders = ",".join("?" for _ in ids)
        rows = self._query(
            f"SELECT response_id, value FROM feedback WHERE id IN ("
            f" SELECT MAX(id) FROM feedback WHERE response_id IN ({placeholders})"
            f" AND {rater_sql} GROUP BY response_id)",
            ids + rater,
        )
        return {r["response_id"]: r["value"] for r in rows}

    def rated_responses(self, watermark: int | None = None) -> list[dict]:
        """Each (response, rater) with its latest non-zero thumb.

        A rater is the logged-in user, else the browser session. Only feedback
        with id up to `watermark` is considered when one is given.
        """
        cap = "" if watermark is None else "AND f.id <= :watermark"
        sql = f"""
            WITH latest AS (
                SELECT MAX(f.id) AS id FROM feedback f
                WHERE 1 = 1 {cap}
                GROUP BY f.response_id, COALESCE(f.user, ''), COALESCE(f.session_id, '')
            )
            SELECT f.id AS feedback_id, f.value, f.comment, f.user, f.session_id,
                   f.created_at AS rated_at, r.id AS response_id, r.conversation_id,
                   r.prompt, r.prompt_hash, r.reply, r.model_version
            FROM latest JOIN feedback f ON f.id = latest.id
            JOIN responses r ON r.id = f.response_id
            WHERE f.value != 0
            ORDER BY f.id
        """
        rows = (self._query(sql, {"watermark": watermark}))
        for row in rows:
            row["prompt"] = json.loads(row["prompt"])
        return rows

    def user_prompts(self, limit: int = 1000) -> list[dict]:
        """Distinct prompts people sent (rated or not): the pool PPO samples
        rollouts from.

        Each is ``{prompt, prompt_hash, conversation_id, raters}``: the
        messages up to the user's turn, as the model saw them, and who sent
        them (``{user, session_id}`` each, as replies record their rater).
        At most `limit`, taken evenly across raters (user, else session),
        newest first within each: every rater's newest prompt, then every
        rater's second newest, and so on, so that one rater sending many
        prompts cannot push everyone else's out of the pool.
        """
        # One statement, so the pool and its senders are read at the same moment.
        rows = self._query(
            """
            WITH sent AS (
                SELECT prompt_hash, user, session_id, MAX(rowid) AS newest FROM responses
                GROUP BY prompt_hash, user, session_id
            ),
            ranked AS (
                SELECT prompt_hash, newest, ROW_NUMBER() OVER (
                    PARTITION BY CASE WHEN COALESCE(user, '') != '' THEN 'user:' || user
                                      ELSE 'session:' || COALESCE(session_id, '') END
                    ORDER BY newest DESC) AS turn
                FROM sent
            ),
            pool AS (
                SELECT prompt_hash, MIN(turn) AS turn, MAX(newest) AS newest FROM ranked
                GROUP BY prompt_hash ORDER BY turn, newest DESC LIMIT :limit
            )
            SELECT pool.prompt_hash, newest.prompt, newest.conversation_id, sent.user, sent.session_id
            FROM pool JOIN responses newest ON newest.rowid = pool.newest
            JOIN sent ON sent.prompt_hash = pool.prompt_hash
            ORDER BY pool.turn, pool.newest DESC, sent.user, sent.session_id
            """,
            {"limit": limit},
        )
        pool: dict[str, dict] = {}
        for r in rows:
            item = pool.setdefault(r["prompt_hash"], {
                "prompt": json.loads(r["prompt"]), "prompt_hash": r["prompt_hash"],
                "conversation_id": r["conversation_id"], "raters": []})
            item["raters"].append({"user": r["user"], "session_id": r["session_id"]})
        return list(pool.values())

    # -- export in TRL's shapes ---------------------------------------------

    def unpaired_examples(self, watermark: int | None = None) -> list[dict]:
        """`{prompt, completion, label}` rows, TRL's conversational unpaired format."""
        return [
            {
                "prompt": row["prompt"],
                "completion": [{"role": "assistant", "content": row["reply"]}],
                "label": row["value"] > 0,
            }
            for row in self.rated_responses(watermark)
        ]

    def preference_pairs(self, watermark: int | None = None) -> list[dict]:
        """`{prompt, chosen, rejected}` rows: replies to the same prompt, one up, one down.

        Replies count as alternatives when their prompt messages are identical
        (regenerate in the chat, or the same opening line from two people).
        Every liked reply is paired with every disliked one; a reply that one
        rater liked and another disliked is left out of pairs.
        """
        by_prompt: dict[str, dict[str, set]] = {}
        prompts: dict[str, list] = {}
        replies: dict[str, str] = {}
        for row in self.rated_responses(watermark):
            group = by_prompt.setdefault(row["prompt_hash"], {"up": set(), "down": set()})
            group["up" if row["value"] > 0 else "down"].add(row["response_id"])
            prompts[row["prompt_hash"]] = row["prompt"]
            replies[row["response_id"]] = row["reply"]
        pairs = []
        for key, group in by_prompt.items():
            ups, downs = group["up"] - group["down"], group["down"] - group["up"]
            for chosen in sorted(ups):
                for rejected in sorted(downs):
                    if replies[chosen] == replies[rejected]:
                        continue
                    pairs.append(
                        {
                            "prompt": prompts[key],
                            "chosen": [{"role": "assistant", "content": replies[chosen]}],
                            "rejected": [{"role": "assistant", "content": replies[rejected]}],
                        }
                    )
        return pairs

    def export_jsonl(self, path: str | os.PathLike, shape: str = "unpaired") -> int:
        """Write feedback as JSON lines; return the number of rows written.

        The file is written beside its final name and renamed into place, so
        a crash never leaves a truncated export behind.
        """
        if shape == "unpaired":
            rows = self.unpaired_examples()
        elif shape == "paired":
            rows = self.preference_pairs()
        else:
            raise StoreError(f"unknown export shape {shape!r}: use 'unpaired' or 'paired'")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fp:
            for row in rows:
                fp.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return len(rows)

    # -- runs ---------------------------------------------------------------

    def start_run(self, kind: str, *, config: dict | None = None, watermark: int | None = None,
                  exclusive: bool = False) -> int:
        """Record a run as running in this process; return its id.

        With `exclusive`, refuse (`RunInProgress`) while another run is still
        running: one retrain at a time, across every process on the data dir.
        """
        with self._write() as db:
            if exclusive:
                self._fail_stale_runs(db)
                busy = list(db.query("SELECT id, pid, host FROM runs WHERE status = 'running' LIMIT 1"))
                if busy:
                    run = busy[0]
                    raise RunInProgress(f"run {run['id']} is still running (pid {run['pid']} on "
                                        f"{run['host'] or 'this host'}); one retrain at a time")
            now = utcnow()
            cursor = db.execute(
                "INSERT INTO runs (kind, status, started_at, watermark, config, pid, host, heartbeat_at)"
                " VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                [kind, now, watermark, _dumps(config), os.getpid(), HOST, now],
            )
            return cursor.lastrowid

    def update_run_progress(self, run_id: int, progress: dict) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET progress = ?, heartbeat_at = ? WHERE id = ?",
                       [_dumps(progress), utcnow(), run_id])

    def running_run(self) -> dict | None:
        """The run in progress, if any (after marking dead ones failed)."""
        self.fail_stale_runs()
        rows = (self._query("SELECT * FROM runs WHERE status = 'running' ORDER BY id DESC LIMIT 1"))
        return _decode_run(rows[0]) if rows else None

    def fail_stale_runs(self) -> list[int]:
        """Mark failed every run left `running` by a process that is gone.

        A process killed mid-run (SIGKILL, out of memory, power cut) cannot
        record its own end; whoever looks next does it for it. Returns the ids.
        """
        # Called on every status read and scheduler check: take the write
        # lock only when some run is marked running at all.
        if not (self._query("SELECT 1 FROM runs WHERE status = 'running' LIMIT 1")):
            return []
        with self._write() as db:
            return self._fail_stale_runs(db)

    def _fail_stale_runs(self, db) -> list[int]:
        stale = []
        for run in db.query("SELECT id, pid, host, heartbeat_at, started_at FROM runs WHERE status = 'running'"):
            if run["host"] in (None, HOST):
                gone = not _pid_alive(run["pid"])
                why = f"the training process (pid {run['pid']}) ended without recording a result"
            else:  # another machine's run: judged by its heartbeat
                last = datetime.fromisoformat(run["heartbeat_at"] or run["started_at"])
                gone = (datetime.now(timezone.utc) - last).total_seconds() > STALE_HEARTBEAT_S
                why = f"no progress from host {run['host']} for over {STALE_HEARTBEAT_S // 60} minutes"
            if gone:
                stale.append(run["id"])
                db.execute(
                    "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                    [utcnow(), f"{why} (killed or crashed)", run["id"]],
                )
        return stale

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: dict | None = None,
        error: str | None = None,
    ) -> None:
        if status not in RUN_STATUSES or status == "running":
            raise StoreError(f"a run finishes as one of succeeded/failed/refused, not {status!r}")
        with self._write() as db:
            # Only a run still running can finish: one already marked failed
            # (its process was presumed dead) keeps that verdict.
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, metrics = ?, error = ?"
                " WHERE id = ? AND status = 'running'",
                [status, utcnow(), _dumps(metrics), error, run_id],
            )

    def get_run(self, run_id: int) -> dict | None:
        rows = (self._query("SELECT * FROM runs WHERE id = ?", [run_id]))
        return _decode_run(rows[0]) if rows else None

    def runs(self, limit: int = 20) -> list[dict]:
        rows = self._query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", [limit])
        return [_decode_run(r) for r in rows]

    # -- adapters -------------------------------------------------------------

    def allocate_version(self) -> str:
        """The next adapter version name. Never reused: numbers only grow."""
        row = self._query("SELECT COALESCE(MAX(number), 0) AS n FROM adapters")[0]
        return f"v{row['n'] + 1}"

    def register_adapter(
        self,
        version: str,
        *,
        path: str,
        base_model: str,
        run_id: int | None = None,
        status: str = "candidate",
        metrics: dict | None = None,
        watermark: int | None = None,
    ) -> None:
        number = _version_number(version)
        if number < 1:
            raise StoreError("v0 is the base model; adapters are v1, v2, ...")
        if status not in ADAPTER_STATUSES:
            raise StoreError(f"unknown adapter status {status!r}")
        now = utcnow()
        with self._write() as db:
            if status == "active":
                db.execute(
                    "UPDATE adapters SET status = 'retired', updated_at = ? WHERE status = 'active'",
                    [now],
                )
            db.execute(
                "INSERT INTO adapters (version, number, path, base_model, run_id, status,"
                " watermark, metrics, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version, number, str(path), base_model, run_id, status, watermark,
                 _dumps(metrics), now, now],
            )

    def set_adapter_status(self, version: str, status: str, reason: str | None = None) -> None:
        """Change an adapter's status; making one active retires the previous one."""
        if status not in ADAPTER_STATUSES:
            raise StoreError(f"unknown adapter status {status!r}")
        now = utcnow()
        with self._write() as db:
            if not list(db.query("SELECT 1 FROM adapters WHERE version = ?", [version])):
                raise StoreError(f"no adapter {version!r}")
            if status == "active":
                db.execute(
                    "UPDATE adapters SET status = 'retired', updated_at = ?"
                    " WHERE status = 'active' AND version != ?",
                    [now, version],
                )
            db.execute(
                "UPDATE adapters SET status = ?, reason = COALESCE(?, reason), updated_at = ?"
                " WHERE version = ?",
                [status, reason, now, version],
            )

    def activate_base(self) -> None:
        """Serve the base model (v0): retire whichever adapter is active."""
        self.promote(BASE_VERSION)

    def promote(self, version: str, *, action: str = "promote", actor: str | None = None,
                reason: str | None = None) -> dict:
        """Make `version` the active one (``v0``: the base) and log the change.

        Any adapter may be promoted, a rejected candidate included: an
        operator's decision overrides the gate. The adapter's directory must
        still exist; its files are not read here (the store imports neither
        torch nor peft): `chatbot.promotion` checks them before it calls this.
        Returns ``{"active", "previous"}``.
        """
        if action not in ACTIVATION_ACTIONS:
            raise StoreError(f"unknown activation action {action!r}")
        _version_number(version)
        now = utcnow()
        with self._write() as db:
            previous = self._active(db)
            if version != BASE_VERSION:
                rows = list(db.query("SELECT path FROM adapters WHERE version = ?", [version]))
                if not rows:
                    known = ", ".join(r["version"] for r in db.query(
                        "SELECT version FROM adapters ORDER BY number")) or "none yet"
                    raise StoreError(f"no adapter {version!r} (known: v0 (the base), {known})")
                if not Path(rows[0]["path"]).is_dir():
                    raise StoreError(f"adapter {version}'s files are missing from {rows[0]['path']}")
            if version == previous:
                return {"active": version, "previous": previous, "changed": False}
            db.execute("UPDATE adapters SET status = 'retired', updated_at = ? WHERE status = 'active'", [now])
            if version != BASE_VERSION:
                db.execute(
                    "UPDATE adapters SET status = 'active', reason = COALESCE(?, reason), updated_at = ?"
                    " WHERE version = ?",
                    [reason, now, version],
                )
            db.execute(
                "INSERT INTO activations (version, previous, action, actor, reason, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [version, previous, action, actor, reason, now],
            )
        return {"active": version, "previous": previous, "changed": True}

    def rollback(self, to: str | None = None, *, actor: str | None = None) -> dict:
        """Go back to `to`, or to the version that was active before the
        current one was promoted. The version left is retired with a reason."""
        with self._write() as db:
            current = self._active(db)
            to = self._rollback_target(db, current, to)
            result = self.promote(to, action="rollback", actor=actor, reason=None)
            if current != BASE_VERSION:
                db.execute("UPDATE adapters SET reason = ?, updated_at = ? WHERE version = ?",
                           [f"rolled back to {to}", utcnow(), current])
        return result

    def rollback_target(self, to: str | None = None) -> str:
        """The version `rollback(to)` would make active now (to check it first)."""
        with self.connection() as db:
            return self._rollback_target(db, self._active(db), to)

    @staticmethod
    def _rollback_target(db, current: str, to: str | None) -> str:
        if to is None:
            # A fallback is no promotion: what came before it is the version that broke.
            rows = list(db.query(
                "SELECT previous FROM activations WHERE version = ? AND action NOT IN ('rollback', 'fallback')"
                " ORDER BY id DESC LIMIT 1", [current]))
            if not rows:
                raise StoreError(f"nothing to roll back to: no record of what was active before "
                                 f"{current}; name a version with --to")
            to = rows[0]["previous"]
        if to == current:
            raise StoreError(f"{to} is already the active version")
        return to

    def earlier_versions(self) -> list[str]:
        """Every version that was active before the current one, the most
        recently active first, then v0: where a fallback looks."""
        rows = self._query("SELECT previous FROM activations ORDER BY id DESC")
        return list(dict.fromkeys([r["previous"] for r in rows] + [BASE_VERSION]))

    def fall_back(self, broken: str, to: str, *, reason: str, actor: str = "server") -> dict | None:
        """Make `to` active in place of `broken`, a version that fails to load,
        and log it as a ``fallback``. Does nothing (returns None) when `broken`
        is no longer active: another process changed it meanwhile."""
        with self._write() as db:
            if self._active(db) != broken:
                return None
            result = self.promote(to, action="fallback", actor=actor, reason=reason)
            if broken != BASE_VERSION:
                db.execute("UPDATE adapters SET reason = ?, updated_at = ? WHERE version = ?",
                           [f"fell back to {to}: {reason}", utcnow(), broken])
        return result

    def activations(self, limit: int = 50) -> list[dict]:
        return (self._query("SELECT * FROM activations ORDER BY id DESC LIMIT ?", [limit]))

    @staticmethod
    def _active(db) -> str:
        rows = list(db.query("SELECT version FROM adapters WHERE status = 'active'"))
        return rows[0]["version"] if rows else BASE_VERSION

    def active_version(self) -> str:
        rows = (self._query("SELECT version FROM adapters WHERE status = 'active'"))
        return rows[0]["version"] if rows else BASE_VERSION

    def get_adapter(self, version: str) -> dict | None:
        rows = (self._query("SELECT * FROM adapters WHERE version = ?", [version]))
        if not rows:
            return None
        rows[0]["metrics"] = _loads(rows[0]["metrics"])
        return rows[0]

    def adapters(self) -> list[dict]:
        rows = (self._query("SELECT * FROM adapters ORDER BY number"))
        for row in rows:
            row["metrics"] = _loads(row["metrics"])
        return rows

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

    def last_finished_run(self) -> dict | None:
        """The newest run that ended: its status and wall time in seconds."""
        rows = (self._query(
            "SELECT status, started_at, finished_at FROM runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1"))
        if not rows:
            return None
        row = rows[0]
        elapsed = datetime.fromisoformat(row["finished_at"]) - datetime.fromisoformat(row["started_at"])
        return {"status": row["status"], "seconds": elapsed.total_seconds()}

    def last_run_watermark(self) -> int:
        """The watermark of the newest run that got as far as taking one."""
        rows = (self._query(
            "SELECT watermark FROM runs WHERE watermark IS NOT NULL ORDER BY id DESC LIMIT 1"))
        return rows[0]["watermark"] if rows else 0

    def feedback_timeline(self, bucket: str = "hour") -> list[dict]:
        """Thumbs per time bucket: ``{bucket, up, down, approval}``, oldest first.

        Each rater's latest vote on a reply counts once, at the time it was given.
        """
        width = {"minute": 16, "hour": 13, "day": 10}.get(bucket)
        if width is None:
            raise StoreError("bucket is one of minute, hour, day")
        rows = self._query(
            f"""
            WITH latest AS (
                SELECT MAX(id) AS id FROM feedback
                GROUP BY response_id, COALESCE(user, ''), COALESCE(session_id, '')
            )
            SELECT SUBSTR(f.created_at, 1, {width}) AS bucket,
                   SUM(f.value = 1) AS up, SUM(f.value = -1) AS down
            FROM latest JOIN feedback f ON f.id = latest.id
            WHERE f.value != 0 GROUP BY bucket ORDER BY bucket
            """
        )
        return [{**r, "approval": round(r["up"] / (r["up"] + r["down"]), 4)} for r in rows]

    def approval_by_version(self) -> list[dict]:
        """Per model version: replies written, thumbs up and down, approval."""
        rows = self._query(
            """
            WITH latest AS (
                SELECT MAX(id) AS id FROM feedback
                GROUP BY response_id, COALESCE(user, ''), COALESCE(session_id, '')
            ),
            votes AS (
                SELECT r.model_version AS version, SUM(f.value = 1) AS up, SUM(f.value = -1) AS down
                FROM latest JOIN feedback f ON f.id = latest.id JOIN responses r ON r.id = f.response_id
                GROUP BY r.model_version
            ),
            replies AS (SELECT model_version AS version, COUNT(*) AS replies FROM responses
                        GROUP BY model_version)
            SELECT replies.version, replies.replies, COALESCE(votes.up, 0) AS up,
                   COALESCE(votes.down, 0) AS down
            FROM replies LEFT JOIN votes ON votes.version = replies.version
            """
        )
        out = [{**r, "approval": round(r["up"] / (r["up"] + r["down"]), 4) if r["up"] + r["down"] else None}
               for r in rows]
        return sorted(out, key=lambda r: _version_number(r["version"]) if _is_version(r["version"]) else -1)

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
            "database": str(self.path),
        }

    def last_rater_shares(self) -> dict | None:
        """The top raters' shares of the data, before and after the rater
        bound, as the newest run that took a snapshot recorded them, with
        that run's id; None before any."""
        rows = self._query(
            "SELECT id, json_extract(metrics, '$.rater_shares') AS shares FROM runs"
            " WHERE json_extract(metrics, '$.rater_shares') IS NOT NULL ORDER BY id DESC LIMIT 1")
        return {"run_id": rows[0]["id"], **json.loads(rows[0]["shares"])} if rows else None


def run_summary(run: dict) -> dict:
    """A run without its config, traceback and per-step history: what a table shows."""
    metrics = run.get("metrics") or {}
    evaluation = metrics.get("evaluation") or {}
    reward = metrics.get("reward_model") or {}
    return {
        "id": run["id"], "kind": run["kind"], "status": run["status"], "started_at": run["started_at"],
        "finished_at": run["finished_at"], "watermark": run["watermark"], "error": run["error"],
        "version": metrics.get("version"), "gate": metrics.get("gate"),
        "seconds": metrics.get("seconds"), "win_rate": evaluation.get("win_rate"),
        "judge_win_rate": evaluation.get("judge_win_rate"), "kl_to_base": evaluation.get("kl_to_base"),
        "kl_per_token": evaluation.get("kl_per_token"),
        "base_nll": (evaluation.get("base_nll") or {}).get("candidate"),
        "base_nll_of_base": (evaluation.get("base_nll") or {}).get("base"), "reward_auc": reward.get("auc"),
        "progress": run.get("progress") if run["status"] == "running" else None,
    }


def new_response_id() -> str:
    return "resp-" + uuid.uuid4().hex


def _rater_clause(session_id: str | None, user: str | None) -> tuple[str, list]:
    if user is not None:
        return "user = ?", [user]
    if session_id is not None:
        return "session_id = ? AND user IS NULL", [session_id]
    raise StoreError("votes are per rater: give a user or a session id")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child not yet reaped by its parent still has a pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fp:
            return fp.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


_VERSION = re.compile(r"v[0-9]+")  # ASCII digits only: str.isdigit() takes "v²" too


def _is_version(version) -> bool:
    return isinstance(version, str) and _VERSION.fullmatch(version) is not None


def _version_number(version: str) -> int:
    if not _is_version(version):
        raise StoreError(f"a version looks like v0, v1, v2, ...; got {version!r}")
    return int(version[1:])


def _decode_run(row: dict) -> dict:
    for key in ("config", "metrics", "progress"):
        row[key] = _loads(row[key])
    return row
