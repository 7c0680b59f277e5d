"""The adapter registry: every version the bot may serve, its status, and
the log of which one was active when and why. `promote` (and `rollback`,
and the server's `fall_back`, which go through it) is the only way a
version becomes active, and every change is an activation row. Part of
`storage.Store` (a mixin over its connection pool)."""

from __future__ import annotations

import re
from pathlib import Path

from storage.common import BASE_VERSION, StoreError, dumps as _dumps, loads as _loads, utcnow

ADAPTER_STATUSES = ("candidate", "active", "retired", "rejected")
# fallback: a serving process started on a version that failed to load and
# came up on the last one that loads instead; canary: promoted on live thumbs.
ACTIVATION_ACTIONS = ("promote", "gate", "canary", "rollback", "fallback")
# Logged beside them, though no version becomes active: a canary rejected on
# live thumbs (`storage.trials`), so that every decision is in the log.
NOT_ACTIVATING = ("canary_reject",)


class Registry:

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
        """Add a version to the registry, as a candidate (or already rejected);
        `promote` is what makes one active."""
        number = _version_number(version)
        if number < 1:
            raise StoreError("v0 is the base model; adapters are v1, v2, ...")
        if status not in ("candidate", "rejected"):
            raise StoreError(f"an adapter is registered as a candidate or rejected, not {status!r}: "
                             "promote makes one active")
        now = utcnow()
        with self._write() as db:
            db.execute(
                "INSERT INTO adapters (version, number, path, base_model, run_id, status,"
                " watermark, metrics, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version, number, str(path), base_model, run_id, status, watermark,
                 _dumps(metrics), now, now],
            )

    def set_adapter_status(self, version: str, status: str, reason: str | None = None) -> None:
        """Mark an adapter a candidate, retired or rejected (the gate's verdict);
        `promote` is the only way one becomes active."""
        if status not in ADAPTER_STATUSES:
            raise StoreError(f"unknown adapter status {status!r}")
        if status == "active":
            raise StoreError("promote makes a version active (and logs it); a status change cannot")
        now = utcnow()
        with self._write() as db:
            if not list(db.query("SELECT 1 FROM adapters WHERE version = ?", [version])):
                raise StoreError(f"no adapter {version!r}")
            db.execute(
                "UPDATE adapters SET status = ?, reason = COALESCE(?, reason), updated_at = ?"
                " WHERE version = ?",
                [status, reason, now, version],
            )

    def promote(self, version: str, *, action: str = "promote", actor: str | None = None,
                reason: str | None = None, evidence: dict | None = None) -> dict:
        """Make `version` the active one (``v0``: the base) and log the change.

        Any adapter may be promoted, a rejected candidate included: an
        operator's decision overrides the gate. The adapter's directory must
        still exist; its files are not read here (the store imports neither
        torch nor peft): `chatbot.promotion` checks them before it calls this.
        Running live trials end (`storage.trials`), and a promotion starts a
        watch of the new version. `evidence` (the live test's figures, for a
        decision made on thumbs) is kept on the activation row.
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
                "INSERT INTO activations (version, previous, action, actor, reason, evidence, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [version, previous, action, actor, reason, None if evidence is None else _dumps(evidence), now],
            )
            self._close_trials(db, version, previous, action, evidence)
        return {"active": version, "previous": previous, "changed": True}

    def rollback(self, to: str | None = None, *, actor: str | None = None, reason: str | None = None,
                 evidence: dict | None = None) -> dict:
        """Go back to `to`, or to the version that was active before the
        current one was promoted. The version left is retired with a reason."""
        with self._write() as db:
            current = self._active(db)
            to = self._rollback_target(db, current, to)
            result = self.promote(to, action="rollback", actor=actor, reason=reason, evidence=evidence)
            if current != BASE_VERSION:
                db.execute("UPDATE adapters SET reason = ?, updated_at = ? WHERE version = ?",
                           [reason or f"rolled back to {to}", utcnow(), current])
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
                "SELECT previous FROM activations WHERE version = ?"
                " AND action NOT IN ('rollback', 'fallback', 'canary_reject')"
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
        rows = self._query("SELECT * FROM activations ORDER BY id DESC LIMIT ?", [limit])
        return [{**r, "evidence": _loads(r["evidence"]) if r["evidence"] else None} for r in rows]

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


_VERSION = re.compile(r"v[0-9]+")  # ASCII digits only: str.isdigit() takes "v²" too


def _is_version(version) -> bool:
    return isinstance(version, str) and _VERSION.fullmatch(version) is not None


def _version_number(version: str) -> int:
    if not _is_version(version):
        raise StoreError(f"a version looks like v0, v1, v2, ...; got {version!r}")
    return int(version[1:])
