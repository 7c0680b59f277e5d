"""The run log: every retrain, running, succeeded, refused or failed, with
its progress, error and metrics. Part of `storage.Store` (a mixin over its
connection pool)."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from storage.common import RunInProgress, StoreError, dumps as _dumps, loads as _loads, utcnow

RUN_STATUSES = ("running", "succeeded", "failed", "refused")
HOST = socket.gethostname()
# A run on another machine that has not reported for this long is presumed dead.
STALE_HEARTBEAT_S = 1800


class RunLog:

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
        "base_nll_of_base": (evaluation.get("base_nll") or {}).get("base"),
        "excess_nll": (evaluation.get("excess_nll") or {}).get("candidate"), "reward_auc": reward.get("auc"),
        "progress": run.get("progress") if run["status"] == "running" else None,
    }


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


def _decode_run(row: dict) -> dict:
    for key in ("config", "metrics", "progress"):
        row[key] = _loads(row[key])
    return row
