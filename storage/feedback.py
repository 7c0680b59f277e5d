"""The feedback log: conversations, the replies the bot wrote, and the
thumbs people gave them, with the reads training and the console make of
them. Part of `storage.Store` (a mixin over its connection pool)."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Iterable

import storage.shapes as shapes
from storage.common import ResponseNotFound, StoreError, dumps as _dumps, loads as _loads, prompt_hash, utcnow
from storage.registry import _is_version, _version_number


class FeedbackLog:

    def start_conversation(
        self, session_id: str | None = None, user: str | None = None, *, conversation_id: str | None = None
    ) -> str:
        """A new conversation's id: random, or `conversation_id` where the
        caller names it (the simulation does, so that a seed fixes which
        conversations are held out: the split is a hash of the id)."""
        conversation_id = conversation_id or uuid.uuid4().hex
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
        correction: str | None = None,
    ) -> int:
        """Append one thumb (+1, -1, or 0 for a vote taken back); return its id.

        A changed mind is a new row: nothing is overwritten, the latest counts.
        The rater is `user`, else `session_id` (`log_response` says the rest).
        A `correction` is the reply the rater would have liked instead: it
        comes with a thumbs-down (value -1) and becomes, for training, a pair
        (the correction over the reply) and a liked reply to the same prompt.
        """
        if isinstance(value, bool) or value not in (-1, 0, 1):
            raise StoreError(f"feedback value must be 1, -1 or 0, not {value!r}")
        if comment is not None:
            comment = comment.strip() or None
        if correction is not None:
            correction = correction.strip() or None
            if correction is not None and value != -1:
                raise StoreError("a correction replaces the reply: it comes with a thumbs-down (value -1)")
        try:
            with self._write() as db:
                cursor = db.execute(
                    "INSERT INTO feedback (response_id, session_id, user, value, comment, claimed_user,"
                    " identified_by, correction, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [response_id, session_id, user, int(value), comment, claimed_user, identified_by, correction,
                     utcnow()],
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
        with id up to `watermark` is considered when one is given. While the
        rater's latest thumb is down, `correction` is the newest reply they
        wrote in its place (else None).
        """
        cap = "" if watermark is None else "AND f.id <= :watermark"
        sql = f"""
            WITH latest AS (
                SELECT MAX(f.id) AS id FROM feedback f
                WHERE 1 = 1 {cap}
                GROUP BY f.response_id, COALESCE(f.user, ''), COALESCE(f.session_id, '')
            ),
            corrected AS (
                SELECT MAX(f.id) AS id, f.response_id, COALESCE(f.user, '') AS user,
                       COALESCE(f.session_id, '') AS session_id
                FROM feedback f WHERE f.correction IS NOT NULL {cap}
                GROUP BY f.response_id, COALESCE(f.user, ''), COALESCE(f.session_id, '')
            )
            SELECT f.id AS feedback_id, f.value, f.comment, f.user, f.session_id,
                   f.created_at AS rated_at, r.id AS response_id, r.conversation_id,
                   r.prompt, r.prompt_hash, r.reply, r.model_version,
                   CASE WHEN f.value = -1 THEN c.correction END AS correction
            FROM latest JOIN feedback f ON f.id = latest.id
            JOIN responses r ON r.id = f.response_id
            LEFT JOIN corrected ON corrected.response_id = f.response_id
                 AND corrected.user = COALESCE(f.user, '') AND corrected.session_id = COALESCE(f.session_id, '')
            LEFT JOIN feedback c ON c.id = corrected.id
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
        """`{prompt, completion, label}` rows, TRL's conversational unpaired
        format: every rated reply, and every correction as a liked one."""
        rows = self.rated_responses(watermark)
        return ([shapes.unpaired_row(row["prompt"], row["reply"], row["value"] > 0) for row in rows]
                + [shapes.unpaired_row(row["prompt"], text, True) for row, text in shapes.corrections(rows)])

    def preference_pairs(self, watermark: int | None = None) -> list[dict]:
        """`{prompt, chosen, rejected}` rows by `storage.shapes`' pair rule,
        then every correction over the reply it corrects."""
        rows = self.rated_responses(watermark)
        by_prompt: dict[str, list[dict]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt_hash"], []).append(row)
        return ([shapes.paired_row(chosen["prompt"], chosen["reply"], rejected["reply"])
                 for group in by_prompt.values() for chosen, rejected in shapes.preference_pairs(group)]
                + [shapes.paired_row(row["prompt"], text, row["reply"]) for row, text in shapes.corrections(rows)])

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


def new_response_id() -> str:
    return "resp-" + uuid.uuid4().hex


def _rater_clause(session_id: str | None, user: str | None) -> tuple[str, list]:
    if user is not None:
        return "user = ?", [user]
    if session_id is not None:
        return "session_id = ? AND user IS NULL", [session_id]
    raise StoreError("votes are per rater: give a user or a session id")
