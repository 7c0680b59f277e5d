"""Live trials: a version tried on live thumbs against another.

- A **canary**: a candidate that passed the offline gate serves a share of
  new conversations beside the active version (`start_canary`); it ends
  promoted (through `Registry.promote`, action ``canary``), rejected
  (`reject_canary`, which logs a ``canary_reject`` activation row: every
  decision is in the activation log with its evidence), or superseded (a
  newer candidate took its place, or another version became active).
- A **watch**: every promotion starts one (`Registry.promote` does it), the
  new version against the one before it; it ends passed, rolled back (the
  rollback is a ``rollback`` activation with the evidence), or superseded.

The decisions themselves are made by the serving process
(`chatbot.live_trials`) from the thumbs `live_thumbs` reads; the store keeps
the trials, their last evidence and their outcome. Part of `storage.Store`.
"""

from __future__ import annotations

from storage.common import StoreError, dumps as _dumps, loads as _loads, utcnow

TRIAL_STATUSES = ("running", "promoted", "rejected", "passed", "rolled_back", "superseded", "failed")


class Trials:

    def start_canary(self, version: str, share: float, *, reason: str | None = None) -> dict:
        """Put candidate `version` on `share` of new conversations beside the
        active version. A canary already running is superseded by it."""
        if not 0 < share < 1:
            raise StoreError("a canary serves a share of new conversations between 0 and 1")
        now = utcnow()
        with self._write() as db:
            active = self._active(db)
            if version == active:
                raise StoreError(f"{version} is the active version already")
            rows = list(db.query("SELECT status FROM adapters WHERE version = ?", [version]))
            if not rows:
                raise StoreError(f"no adapter {version!r}")
            for old in db.query("SELECT id, version FROM trials WHERE kind = 'canary' AND status = 'running'"):
                self._end(db, old["id"], "superseded", f"{version} took its place on the canary")
                db.execute("UPDATE adapters SET reason = ?, updated_at = ? WHERE version = ? AND status = 'candidate'",
                           [f"its canary was superseded by {version}", now, old["version"]])
            trial_id = db.execute(
                "INSERT INTO trials (kind, version, other, share, status, reason, started_at)"
                " VALUES ('canary', ?, ?, ?, 'running', ?, ?)", [version, active, share, reason, now]).lastrowid
            db.execute("UPDATE adapters SET reason = ?, updated_at = ? WHERE version = ?",
                       [f"on canary beside {active}: {share:.0%} of new conversations", now, version])
        return self.trial(trial_id)

    def reject_canary(self, trial_id: int, *, reason: str, evidence: dict, actor: str = "canary") -> bool:
        """End a running canary as rejected: its candidate is marked rejected,
        and the decision is an activation row (``canary_reject``) with its
        evidence. False when the trial was no longer running."""
        now = utcnow()
        with self._write() as db:
            trial = self._running(db, trial_id)
            if trial is None:
                return False
            self._end(db, trial_id, "rejected", reason, evidence)
            db.execute("UPDATE adapters SET status = 'rejected', reason = ?, updated_at = ?"
                       " WHERE version = ? AND status = 'candidate'", [reason, now, trial["version"]])
            db.execute("INSERT INTO activations (version, previous, action, actor, reason, evidence, created_at)"
                       " VALUES (?, ?, 'canary_reject', ?, ?, ?, ?)",
                       [trial["version"], self._active(db), actor, reason, _dumps(evidence), now])
        return True

    def end_trial(self, trial_id: int, status: str, *, reason: str, evidence: dict | None = None) -> bool:
        """End a running trial with `status` (a watch that passed, a canary
        whose files fail to load); False when it was no longer running."""
        if status not in TRIAL_STATUSES or status == "running":
            raise StoreError(f"a trial ends as one of {', '.join(TRIAL_STATUSES[1:])}, not {status!r}")
        with self._write() as db:
            if self._running(db, trial_id) is None:
                return False
            self._end(db, trial_id, status, reason, evidence)
        return True

    def record_evidence(self, trial_id: int, evidence: dict) -> None:
        """The sequential test's latest look at a running trial."""
        with self._write() as db:
            db.execute("UPDATE trials SET evidence = ? WHERE id = ? AND status = 'running'",
                       [_dumps(evidence), trial_id])

    def trial(self, trial_id: int) -> dict | None:
        rows = self._query("SELECT * FROM trials WHERE id = ?", [trial_id])
        return _decoded(rows[0]) if rows else None

    def running_trials(self) -> list[dict]:
        return [_decoded(r) for r in self._query("SELECT * FROM trials WHERE status = 'running' ORDER BY id")]

    def running_canary(self) -> dict | None:
        return next((t for t in self.running_trials() if t["kind"] == "canary"), None)

    def trials(self, limit: int = 20) -> list[dict]:
        return [_decoded(r) for r in self._query("SELECT * FROM trials ORDER BY id DESC LIMIT ?", [limit])]

    def live_thumbs(self, version: str, *, since: str | None = None, before: str | None = None,
                    last: int | None = None) -> list[int]:
        """Thumbs on replies `version` wrote (from `since`, before `before`),
        1 up and 0 down, in the order they were first given: each rater's
        latest vote on a reply counts once; votes taken back do not count.
        `last` keeps only the most recent ones."""
        clauses, params = ["r.model_version = ?"], [version]
        if since is not None:
            clauses.append("r.created_at >= ?")
            params.append(since)
        if before is not None:
            clauses.append("r.created_at < ?")
            params.append(before)
        rows = self._query(
            f"""
            WITH votes AS (
                SELECT MIN(f.id) AS first, MAX(f.id) AS latest FROM feedback f
                JOIN responses r ON r.id = f.response_id
                WHERE {' AND '.join(clauses)}
                GROUP BY f.response_id, COALESCE(f.user, ''), COALESCE(f.session_id, '')
            )
            SELECT f.value FROM votes JOIN feedback f ON f.id = votes.latest
            WHERE f.value != 0 ORDER BY votes.first
            """, params)
        values = [1 if r["value"] == 1 else 0 for r in rows]
        return values[-last:] if last else values

    # -- inside the registry's write ---------------------------------------------

    def _close_trials(self, db, version: str, previous: str, action: str, evidence: dict | None) -> None:
        """`version` became active in place of `previous`: the canary of that
        version ends promoted, a watch of the version left by a rollback ends
        rolled back, every other running trial is superseded; a promotion
        (not a rollback or fallback) starts a watch."""
        for trial in db.query("SELECT id, kind, version FROM trials WHERE status = 'running'"):
            if trial["kind"] == "canary" and trial["version"] == version:
                self._end(db, trial["id"], "promoted", f"promoted by {action}", evidence)
            elif trial["kind"] == "watch" and trial["version"] == previous and action == "rollback":
                self._end(db, trial["id"], "rolled_back", f"rolled back to {version}", evidence)
            else:
                self._end(db, trial["id"], "superseded", f"{version} became active ({action})")
        if action in ("promote", "gate", "canary"):
            db.execute("INSERT INTO trials (kind, version, other, status, started_at)"
                       " VALUES ('watch', ?, ?, 'running', ?)", [version, previous, utcnow()])

    @staticmethod
    def _running(db, trial_id: int) -> dict | None:
        rows = list(db.query("SELECT * FROM trials WHERE id = ? AND status = 'running'", [trial_id]))
        return rows[0] if rows else None

    @staticmethod
    def _end(db, trial_id: int, status: str, reason: str, evidence: dict | None = None) -> None:
        db.execute("UPDATE trials SET status = ?, reason = ?, evidence = COALESCE(?, evidence), ended_at = ?"
                   " WHERE id = ?", [status, reason, None if evidence is None else _dumps(evidence), utcnow(),
                                     trial_id])


def _decoded(row: dict) -> dict:
    return {**row, "evidence": _loads(row["evidence"])}
