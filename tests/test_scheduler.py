"""The retrain schedule: when it starts a run, the training process it
starts, and what happens when that process dies."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from online_rl.scheduler import RetrainScheduler, ScheduleConfig
from storage import RunInProgress
from tests.test_retrain import _thumbs

ROOT = Path(__file__).resolve().parents[1]


def _retrain(data_dir, model, *extra):
    def command(method, threads):
        return [sys.executable, str(ROOT / "app.py"), "retrain", "--data-dir", str(data_dir), "--model", str(model),
                "--device", "cpu", "--method", method, "--threads", str(threads), "--min-feedback", "10", *extra]
    return command


def _scheduler(store, data_dir, command, **config):
    # The scheduling mechanics, with PPO cut to one step: the quickest cycle.
    config = ScheduleConfig(every_s=0, min_new_feedback=10, threads=1, **{"method": "ppo", **config})
    return RetrainScheduler(store, command, config, log_dir=data_dir / "logs")


def test_config_is_checked():
    with pytest.raises(ValueError, match="not a crontab expression"):
        ScheduleConfig(cron="every day").validate()
    assert ScheduleConfig(cron="0 3 * * *").validate().enabled
    assert not ScheduleConfig(every_s=0).validate().enabled
    with pytest.raises(ValueError, match="--min-new-feedback"):
        ScheduleConfig(min_new_feedback=0).validate()


def test_check_waits_for_enough_new_feedback_and_respects_pause(store, data_dir):
    never = _scheduler(store, data_dir, lambda m, t: pytest.fail("must not start"))
    _thumbs(store, 6)
    decision = never.check()
    assert not decision["start"] and decision["reason"] == "6 new feedback rows since the last run, 10 needed"
    _thumbs(store, 6, session="more")
    never.pause()
    assert never.check()["reason"] == "the schedule is paused"
    # The pause is in the database: a scheduler made after a restart keeps it.
    assert _scheduler(store, data_dir, lambda m, t: []).paused
    # A run in progress in another process blocks a new one.
    store.start_run("ppo", watermark=0)
    never.resume()
    assert "in progress" in never.check()["reason"]


def test_a_training_process_that_dies_before_its_run_is_recorded_as_failed(store, data_dir):
    crash = [sys.executable, "-c", "import sys; print('cannot import the trainer'); sys.exit(3)"]
    scheduler = _scheduler(store, data_dir, lambda m, t: crash)
    _thumbs(store, 10)
    assert scheduler.check()["started"]
    assert scheduler.wait_for_child(30) == 3
    run = store.runs(1)[0]
    assert run["status"] == "failed"
    assert run["error"] == ("the training process exited with code 3 before starting its run: "
                            "cannot import the trainer")


def test_a_scheduled_retrain_runs_in_its_own_process_and_passes_through_the_gate(store, data_dir, tiny_model_dir):
    leftover = data_dir / "adapters" / ".run-99.partial"  # what a killed run leaves behind
    leftover.mkdir(parents=True)
    scheduler = _scheduler(store, data_dir, _retrain(data_dir, tiny_model_dir, "--ppo-steps", "1"))
    _thumbs(store, 40)
    decision = scheduler.check()
    assert decision["start"] and decision["pid"] != os.getpid()
    with pytest.raises(RunInProgress):
        scheduler.retrain_now("ppo")
    assert scheduler.wait_for_child(300) == 0, Path(decision["log"]).read_text()[-2000:]
    run = store.runs(1)[0]
    assert run["status"] == "succeeded" and run["pid"] == decision["pid"]
    gate = run["metrics"]["gate"]
    adapter = store.get_adapter("v1")
    assert adapter["status"] == ("active" if gate["passed"] else "rejected")
    assert not leftover.exists()
    assert "gate:" in Path(decision["log"]).read_text()
    # Nothing new since that run's watermark: the next check waits.
    assert scheduler.check()["reason"].startswith("0 new feedback rows")


def test_killing_the_training_process_mid_run_leaves_a_failed_run_and_nothing_loaded(
        store, data_dir, tiny_model_dir, tiny_loaded):
    from chatbot.policy import GenerationSettings, Policy
    from chatbot.swap import VersionFollower

    policy = Policy(tiny_loaded)
    follower = VersionFollower(policy, store)
    scheduler = _scheduler(store, data_dir, _retrain(data_dir, tiny_model_dir, "--ppo-steps", "500"))
    _thumbs(store, 40)
    started = scheduler.retrain_now("ppo")
    deadline = time.monotonic() + 120
    while True:  # wait until it is training
        run = store.running_run()
        if run and run["progress"].get("stage") == "policy":
            break
        assert time.monotonic() < deadline, Path(started["log"]).read_text()[-2000:]
        time.sleep(0.2)
    os.kill(started["pid"], signal.SIGKILL)
    assert scheduler.wait_for_child(30) == -signal.SIGKILL
    run = store.get_run(run["id"])
    assert run["status"] == "failed" and "ended without recording a result" in run["error"]
    assert store.adapters() == [] and store.running_run() is None
    # The bot kept serving the version it had, and a new run may start.
    assert follower.sync() is None and policy.version == "v0"
    assert policy.generate([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=4)).text is not None
    assert store.start_run("ppo", exclusive=True)


def test_a_run_left_running_by_a_dead_process_is_failed_on_the_next_start(store, data_dir):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = store.start_run("ppo", watermark=0)
    with store.connection() as db:
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", [dead.pid, run_id])
        db.conn.commit()
    _scheduler(store, data_dir, lambda m, t: []).start().shutdown()
    run = store.get_run(run_id)
    assert run["status"] == "failed" and f"pid {dead.pid}" in run["error"]
    # A process that is still alive keeps its run.
    live = store.start_run("kto", watermark=0)
    assert store.fail_stale_runs() == [] and store.get_run(live)["status"] == "running"
