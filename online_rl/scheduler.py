"""Retrains on a schedule, each in a training process of its own.

An APScheduler `BackgroundScheduler` inside the server runs `check` every
`every_s` seconds (or on a cron expression). A check starts a retrain only
when the schedule is not paused, no run is in progress, and at least
`min_new_feedback` feedback rows arrived since the last run's watermark.

The retrain runs in a child process (the command comes from the caller,
normally ``python app.py retrain ...``) with its own copy of the base, its
torch threads limited and its CPU priority lowered, so that the chat stays
responsive and a crash in training cannot take the server down. The child
records its own run; if it dies without doing so (killed, out of memory),
the scheduler records the run as failed with the end of its log. One run at a
time: the job has ``max_instances=1`` and coalesces missed checks, and the
database refuses a second running run from any process.

The paused flag lives in the database, so a restart keeps it; the retrain
decision reads only the database, so the schedule carries on after a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from online_rl import METHODS
from storage import RunInProgress, Store, StoreError

log = logging.getLogger("chatbot.scheduler")

PAUSED_KEY = "schedule_paused"


@dataclass
class ScheduleConfig:
    every_s: float = 900.0  # seconds between checks; 0 turns the periodic check off
    cron: str | None = None  # a crontab expression ("0 3 * * *"), instead of every_s
    min_new_feedback: int = 50  # feedback rows since the last run's watermark needed to start one
    method: str = METHODS[0]
    threads: int = 0  # torch threads in the training process; 0: half the cores, at least 1
    nice: int = 10  # CPU priority of the training process (higher: yields more to the chat)
    first_check_s: float = 30.0  # the first check after start (the model is loading meanwhile)

    def validate(self) -> "ScheduleConfig":
        if self.every_s < 0:
            raise ValueError("--retrain-every is in seconds, 0 to turn the schedule off")
        if self.cron:
            self.trigger()  # raises ValueError on a bad expression
        if self.min_new_feedback < 1:
            raise ValueError("--min-new-feedback must be at least 1")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cron) or self.every_s > 0

    def trigger(self):
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if self.cron:
            try:
                return CronTrigger.from_crontab(self.cron, timezone=timezone.utc)
            except ValueError as exc:
                raise ValueError(f"--retrain-cron {self.cron!r} is not a crontab expression "
                                 f"(minute hour day month weekday): {exc}") from None
        return IntervalTrigger(seconds=self.every_s, timezone=timezone.utc)

    def training_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 2) // 2)


CommandFn = Callable[[str, int], list[str]]  # (method, threads) -> argv of the training process


class RetrainScheduler:
    """The background scheduler and the training process it starts.

    `command(method, threads)` returns the argv of one retrain;
    `log_dir` receives one log file per training process.
    """

    def __init__(self, store: Store, command: CommandFn, config: ScheduleConfig, *, log_dir: str | Path):
        self.store = store
        self.command = command
        self.config = config.validate()
        self.log_dir = Path(log_dir)
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._child_info: dict = {}
        self._last_check: dict = {}
        self._scheduler = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> "RetrainScheduler":
        from apscheduler.schedulers.background import BackgroundScheduler

        failed = self.store.fail_stale_runs()
        if failed:
            log.warning("runs %s were left running by a process that is gone; marked failed", failed)
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)
        if self.config.enabled:
            first = datetime.now(timezone.utc) + timedelta(seconds=self.config.first_check_s)
            self._scheduler.add_job(
                self._scheduled_check, self.config.trigger(), id="retrain-check", name="retrain check",
                max_instances=1, coalesce=True, misfire_grace_time=None,
                next_run_time=None if self.config.cron else first,
            )
        self._scheduler.start()
        return self

    def shutdown(self, *, stop_training: bool = False) -> None:
        """Stop scheduling. A retrain in progress carries on and records its
        own result unless `stop_training` (its run is then marked failed)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        child = self._child
        if stop_training and child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    # -- the decision ---------------------------------------------------------

    def _scheduled_check(self) -> None:
        try:
            self.check()
        except Exception:  # noqa: BLE001 - a failed check must not stop the schedule
            log.exception("retrain check failed")

    def check(self) -> dict:
        """Start a retrain if the rules allow; return what was decided and why."""
        decision = self._decide()
        if decision["start"]:
            try:
                decision.update(self.retrain_now(self.config.method, trigger="schedule"))
            except RunInProgress as exc:
                decision.update(start=False, reason=str(exc))
        decision["at"] = _now()
        self._last_check = decision
        log.info("retrain check: %s", decision.get("reason") or "started")
        return decision

    def _decide(self) -> dict:
        if self.paused:
            return {"start": False, "reason": "the schedule is paused"}
        running = self.store.running_run()
        if running or self.child_running:
            return {"start": False, "reason": f"run {running['id'] if running else '?'} is in progress"}
        new = self.store.latest_feedback_id() - self.store.last_run_watermark()
        if new < self.config.min_new_feedback:
            return {"start": False, "new_feedback": new,
                    "reason": f"{new} new feedback rows since the last run, {self.config.min_new_feedback} needed"}
        return {"start": True, "new_feedback": new, "reason": f"{new} new feedback rows"}

    # -- the training process -------------------------------------------------

    @property
    def child_running(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def retrain_now(self, method: str | None = None, *, trigger: str = "operator") -> dict:
        """Start one retrain in a training process now; `RunInProgress` if one is going."""
        method = method or self.config.method
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        with self._lock:
            if self.child_running:
                raise RunInProgress(f"a retrain is already running (pid {self._child.pid})")
            running = self.store.running_run()
            if running:
                raise RunInProgress(f"run {running['id']} is still running (pid {running['pid']})")
            threads = self.config.training_threads()
            argv = self.command(method, threads)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            log_path = self.log_dir / f"retrain-{stamp}.log"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
            nice = self.config.nice
            with open(log_path, "wb") as out:
                child = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # its own process group: a Ctrl-C to the server is not its
                    preexec_fn=(lambda: os.nice(nice)) if nice else None,
                )
            self._child = child
            newest = self.store.runs(1)
            self._child_info = {"pid": child.pid, "method": method, "trigger": trigger, "started_at": _now(),
                                "log": str(log_path), "argv": argv, "after_run": newest[0]["id"] if newest else 0}
        log.info("retrain started (%s, %s): pid %s, log %s", method, trigger, child.pid, log_path)
        threading.Thread(target=self._reap, args=(child, method, log_path), daemon=True,
                         name=f"reap-{child.pid}").start()
        return {"started": True, "pid": child.pid, "method": method, "log": str(log_path)}

    def _reap(self, child: subprocess.Popen, method: str, log_path: Path) -> None:
        """Wait for the training process; record a run it could not record itself."""
        code = child.wait()
        self._child_info = {**self._child_info, "exit_code": code, "finished_at": _now()}
        try:
            # Its run: the one started after it (under `accelerate launch`
            # the run's pid is the main worker's, not the launcher's).
            own = [r for r in self.store.runs(20) if r["id"] > self._child_info.get("after_run", 0)]
            if own:
                stale = self.store.fail_stale_runs()  # it was killed mid-run: its row still says running
                if stale:
                    log.error("training process %s %s; run(s) %s marked failed", child.pid, _exit_words(code), stale)
                return
            if code != 0:
                # It died before it could record a run (bad arguments, an import
                # error, killed while starting): record one so nothing fails silently.
                error = f"the training process {_exit_words(code)} before starting its run: {_tail(log_path)}"
                run_id = self.store.start_run(method, config={"argv": self._child_info.get("argv")})
                self.store.finish_run(run_id, "failed", error=error, metrics={"log": str(log_path)})
                log.error("%s (run %s)", error, run_id)
        except StoreError:
            log.exception("could not record the end of training process %s", child.pid)

    # -- pause, resume, state ---------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self.store.get_setting(PAUSED_KEY, False))

    def pause(self) -> None:
        self.store.set_setting(PAUSED_KEY, True)

    def resume(self) -> None:
        self.store.set_setting(PAUSED_KEY, False)

    def state(self) -> dict:
        job = self._scheduler.get_job("retrain-check") if self._scheduler is not None else None
        next_at = job.next_run_time.isoformat() if job is not None and job.next_run_time else None
        return {
            "enabled": self.config.enabled,
            "paused": self.paused,
            "every_s": self.config.every_s if not self.config.cron else None,
            "cron": self.config.cron,
            "min_new_feedback": self.config.min_new_feedback,
            "method": self.config.method,
            "training_threads": self.config.training_threads(),
            "next_check_at": next_at,
            "new_feedback": self.store.latest_feedback_id() - self.store.last_run_watermark(),
            "last_check": self._last_check,
            "training_process": {**{k: v for k, v in self._child_info.items() if k != "argv"},
                                 "running": self.child_running} if self._child_info else None,
        }

    def wait_for_child(self, timeout: float | None = None) -> int | None:
        """Block until the current training process ends (tests, benchmarks)."""
        child = self._child
        if child is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while child.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the training process {child.pid} is still running")
            time.sleep(0.2)
        # let the reaper record what the process could not
        for _ in range(50):
            if "exit_code" in self._child_info:
                break
            time.sleep(0.05)
        return child.returncode


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"

