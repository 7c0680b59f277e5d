"""The operator console: what its helpers compute from the store, and what its
buttons do. No model and no browser: the policy is a stub that only records
which version it serves, and the scheduler a stub that starts nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from chatbot import console, trials_view
from chatbot.adapters import AdapterLoadError
from chatbot.admin import Operations
from chatbot.swap import VersionFollower
from online_rl import METHODS


class StubPolicy:
    def __init__(self):
        self.version = "v0"
        self.canary = None  # serves no canary: the console's tests start none that a sync would load

    def end_canary(self) -> None:
        self.canary = None

    def check_adapter(self, version: str, path: str) -> None:
        """Any adapter passes but one marked broken (the real check: tests/test_registry_faults.py)."""
        if (Path(path) / "BROKEN").exists():
            raise AdapterLoadError(f"adapter {version} ({path}): marked broken")

    def swap_to(self, version: str, path: str | None = None) -> dict:
        if path:
            self.check_adapter(version, path)
        previous, self.version = self.version, version
        return {"version": version, "previous": previous, "total_s": 0.0}


class StubScheduler:
    def __init__(self, store):
        self.store = store
        self.started: list[tuple[str, str]] = []

    def retrain_now(self, method: str | None = None, *, trigger: str = "operator") -> dict:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        self.started.append((method, trigger))
        return {"pid": 4242, "method": method, "trigger": trigger}

    def pause(self) -> None:
        self.store.set_setting("schedule_paused", True)

    def resume(self) -> None:
        self.store.set_setting("schedule_paused", False)

    def state(self) -> dict:
        return {"enabled": True, "paused": bool(self.store.get_setting("schedule_paused", False)),
                "every_s": 600, "cron": None, "min_new_feedback": 20, "method": "ppo",
                "next_check_at": "2030-01-01T00:10:00+00:00", "new_feedback": 3, "last_check": None,
                "training_process": None}


def reply(store, conversation: str, version: str, text: str = "Hello.") -> str:
    return store.log_response(conversation_id=conversation, prompt=[{"role": "user", "content": "Hi"}],
                              reply=text, model_version=version)


@pytest.fixture
def seeded(store, tmp_path):
    """v0 replies: 1 up, 2 down (one of the downs a changed mind from up);
    v1 replies: 3 up, 1 down. Runs: a succeeded one that made v1, a failed one
    with HTML in its error, and a running PPO run at step 3 of 8."""
    conversation = store.start_conversation(session_id="s1")
    v0 = [reply(store, conversation, "v0") for _ in range(3)]
    v1 = [reply(store, conversation, "v1") for _ in range(4)]
    store.record_feedback(v0[0], 1, session_id="s1")
    store.record_feedback(v0[1], -1, session_id="s1")
    store.record_feedback(v0[2], 1, session_id="s1")
    store.record_feedback(v0[2], -1, session_id="s1")  # changed mind: only this one counts
    for rid, value in zip(v1, (1, 1, 1, -1)):
        store.record_feedback(rid, value, session_id="s1")

    done = store.start_run("ppo", watermark=3)
    store.finish_run(done, "succeeded", metrics={
        "version": "v1", "seconds": 12.34, "gate": {"passed": True, "reason": "passed every check"},
        "evaluation": {"win_rate": 0.625, "judge_win_rate": 0.55, "kl_per_token": 0.01234,
                       "base_nll": {"candidate": 0.2, "base": 0.19},
                       "excess_nll": {"candidate": 0.004, "base": 0.0}}, "reward_model": {"auc": 0.8}})
    for version in ("v1", "v2"):
        path = tmp_path / "adapters" / version
        path.mkdir(parents=True)
        store.register_adapter(version, path=str(path), base_model="stub", run_id=done)
    store.promote("v1", actor="test")
    failed = store.start_run("kto", watermark=5)
    store.finish_run(failed, "failed", error="ValueError: <script>alert(1)</script> " + "x" * 500)
    running = store.start_run("ppo", watermark=8)
    store.update_run_progress(running, {"stage": "ppo", "message": "ppo: step 3/8 done <b>", "elapsed_s": 41.5,
                                        "step": 3, "of": 8})
    return {"done": done, "failed": failed, "running": running}


@pytest.fixture
def ops(store, seeded):
    follower = VersionFollower(StubPolicy(), store)
    follower.sync()
    return Operations(store, follower, StubScheduler(store))


@pytest.fixture
def app(ops):
    return console.Console(ops)


# -- helpers --------------------------------------------------------------------------


def test_approval_per_version_counts_latest_votes(ops):
    frame = console.versions_frame(ops.store.approval_by_version()).set_index("version")
    assert frame.loc["v0", "votes"] == 3
    assert frame.loc["v0", "approval"] == pytest.approx(1 / 3, abs=1e-3)
    assert frame.loc["v1", "votes"] == 4
    assert frame.loc["v1", "approval"] == pytest.approx(0.75)


def test_versions_without_votes_are_left_out_of_the_plot():
    rows = [{"version": "v0", "replies": 2, "up": 0, "down": 0, "approval": None},
            {"version": "v1", "replies": 1, "up": 1, "down": 0, "approval": 1.0}]
    assert list(console.versions_frame(rows)["version"]) == ["v1"]
    assert list(console.versions_table(rows)["approval"]) == ["–", "100%"]


def test_timeline_frames_long_form_and_approval():
    rows = [{"bucket": "2024-05-01T12", "up": 3, "down": 1, "approval": 0.75},
            {"bucket": "2024-05-01T13", "up": 0, "down": 2, "approval": 0.0}]
    thumbs, approval = console.timeline_frames(rows)
    counts = {(t.hour, thumb): n for t, thumb, n in thumbs[["time", "thumb", "count"]].itertuples(index=False)}
    assert counts == {(12, "up"): 3, (12, "down"): 1, (13, "up"): 0, (13, "down"): 2}
    assert list(approval["approval"]) == [0.75, 0.0]
    assert list(approval["votes"]) == [4, 2]
    assert pd.api.types.is_datetime64_any_dtype(approval["time"])


def test_timeline_from_the_store(ops):
    thumbs, approval = console.timeline_frames(ops.store.feedback_timeline("minute"))
    assert thumbs.groupby("thumb")["count"].sum().to_dict() == {"up": 4, "down": 3}
    assert len(approval) >= 1


@pytest.mark.parametrize("plot", ["line", "bar"])
def test_empty_data_makes_empty_plots(plot):
    thumbs, approval = console.timeline_frames([])
    versions = console.versions_frame([])
    assert thumbs.empty and approval.empty and versions.empty
    if plot == "line":
        shown = gr.LinePlot(x="time", y="count", color="thumb").postprocess(thumbs)
        assert shown.datatypes["time"] == "temporal"
    else:
        shown = gr.BarPlot(x="version", y="approval").postprocess(versions)
    assert shown.data == []


def test_status_markdown(ops):
    text = console.status_markdown(ops.status())
    assert "**Active** v1" in text and "**serving** v1" in text
    assert "approval** 57%" in text  # 4 up, 3 down on the latest votes
    assert "4 up, 3 down" in text
    assert "every 600 s" in text and "new feedback 3 of 20 needed" in text
    assert "paused" not in text


def test_status_markdown_shows_a_serving_error_escaped():
    status = {"active_version": "v2", "serving": {"serving_version": "v1",
              "error": {"version": "v2", "error": "<img src=x onerror=alert(1)> gone"}},
              "schedule": {"enabled": True, "paused": True, "every_s": 60, "min_new_feedback": 5}}
    text = console.status_markdown(status)
    assert "could not load v2" in text
    assert "<img" not in text and "&lt;img" in text
    assert "**paused**" in text


def test_status_markdown_shows_a_fallback_at_start(store, seeded, tmp_path):
    (Path(store.get_adapter("v1")["path"]) / "BROKEN").touch()
    follower = VersionFollower(StubPolicy(), store)
    follower.come_up()  # a restart: v1 is active and broken
    text = console.status_markdown(Operations(store, follower, StubScheduler(store)).status())
    assert "**Active** v0 · **serving** v0" in text
    assert "**came up on v0 instead of v1:** v1 does not load: adapter v1" in text and "marked broken" in text


def test_progress_of_a_running_run(ops, seeded):
    runs = ops.status(runs=5)["recent_runs"]
    running = console.running_run(runs)
    assert running["id"] == seeded["running"]
    shown = console.progress_html(running)
    assert f"Run {seeded['running']} (ppo) is running" in shown
    assert "step 3 of 8" in shown and "width:37.5%" in shown
    assert "41.5 s elapsed" in shown
    assert "&lt;b&gt;" in shown and "done <b>" not in shown


def test_progress_live_time_since_start():
    started = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    run = {"id": 7, "kind": "kto", "status": "running", "started_at": started.isoformat(),
           "progress": {"stage": "reward model", "message": "training", "elapsed_s": 10.0}}
    shown = console.progress_html(run, now=started + timedelta(seconds=95))
    assert "started 95 s ago" in shown
    assert "step" not in shown  # no bar without step/of


def test_progress_without_a_running_run_shows_the_last_outcome(store):
    assert "No retrain running" in console.progress_html(None) and "No run yet" in console.progress_html(None)
    run_id = store.start_run("kto")
    store.finish_run(run_id, "failed", error="RuntimeError: <script>x</script>")
    last = store.status()["recent_runs"][0]
    shown = console.progress_html(None, last)
    assert f"Last run {run_id} (kto) failed" in shown
    assert "<script>" not in shown and "&lt;script&gt;" in shown


def test_runs_frame(ops, seeded):
    frame = console.runs_frame(ops.status(runs=10)["recent_runs"]).set_index("run")
    assert list(frame.index) == [seeded["running"], seeded["failed"], seeded["done"]]
    done = frame.loc[seeded["done"]]
    assert (done["status"], done["version"], done["gate"]) == ("succeeded", "v1", "passed: passed every check")
    assert (done["win rate"], done["judge"], done["KL/token"], done["reward AUC"], done["seconds"]) == (
        0.625, 0.55, 0.012, 0.8, 12.3)
    assert done["base NLL (base's), excess"] == "0.200 (0.190), excess +0.004"
    error = frame.loc[seeded["failed"], "error"]
    assert error.startswith("ValueError: <script>") and len(error) == console.ERROR_CHARS


def test_rater_shares_of_the_last_run(store, app):
    """The table of the raters who hold the most of the last run's data,
    read from the store as `status` reads it."""
    shares = {"max_rater_share": 0.05,
              "thumbs": {"bound": 0.05, "raters": 21, "rows": 2000, "top": [
                  {"rater": "session:loud", "rows": 1000, "share_before": 0.5, "share_after": 0.05},
                  {"rater": "user:<b>ann</b>", "rows": 50, "share_before": 0.025, "share_after": 0.0476}]},
              "prompts": {"bound": 0.5, "raters": 2, "rows": 30, "top": [
                  {"rater": "session:loud", "rows": 20, "share_before": 0.6667, "share_after": 0.5}]}}
    refused = store.start_run("ppo", watermark=9)
    store.finish_run(refused, "refused", error="not enough feedback", metrics={"rater_shares": shares})
    *_, heading, frame, _, _, _, _, _ = app.refresh(None)
    assert f"run {refused}" in heading and "5.0%" in heading and "21 raters, 2000 thumbs" in heading
    assert list(frame.columns) == console.SHARE_COLUMNS
    assert frame.values.tolist() == [
        ["reward model's thumbs", "session:loud", 1000, "50.0%", "5.0%"],
        ["reward model's thumbs", "user:<b>ann</b>", 50, "2.5%", "4.8%"],
        ["PPO's prompts", "session:loud", 20, "66.7%", "50.0%"]]
    assert console.rater_shares_markdown(None).endswith("No run has read the feedback yet.")
    assert console.rater_shares_frame(None).empty


def test_adapters_frame_and_choices(ops):
    adapters = ops.status()["adapters_by_version"]
    frame = console.adapters_frame(adapters)
    assert list(frame["version"]) == ["v2", "v1"]
    assert list(frame["status"]) == ["candidate", "active"]
    assert [v for _, v in console.version_choices(adapters)] == ["v2", "v1", "v0"]
    assert console.rollback_choices(adapters)[0][1] == console.PREVIOUS


def test_md_text_shows_markup_as_text():
    assert console.md_text("<b>**x**</b>") == r"&lt;b&gt;\*\*x\*\*&lt;/b&gt;"


# -- the page and its handlers ---------------------------------------------------------------


def test_console_builds(ops):
    demo = console.build_console(ops)
    assert isinstance(demo, gr.Blocks)
    config = demo.get_config_file()
    assert all(dep["api_visibility"] == "private" for dep in config["dependencies"])


def test_refresh_updates_choices_only_when_they_change(app):
    first = app.refresh(None)
    status, progress, runs, adapters, versions, _, _, _, _, promote, rollback, shown = first
    assert "**Active** v1" in status and "is running" in progress
    assert len(runs) == 3 and len(adapters) == 2 and len(versions) == 2
    assert [list(c) for c in promote.constructor_args["choices"]] == shown
    assert rollback.constructor_args["choices"][0] == ("the version before the active one", console.PREVIOUS)
    again = app.refresh(shown)
    assert again[9] == gr.skip() and again[10] == gr.skip()


def test_live_trials_show_both_arms_with_their_intervals(store, app):
    """A running canary, with the evidence of the judge's last look, and the
    watch of the last promotion, as the console lists them."""
    from online_rl.sequential import compare

    trial = store.start_canary("v2", 0.1)
    store.record_evidence(trial["id"], compare([1, 1, 0, 1] * 10, [1, 0] * 50))
    *_, heading, frame, _, _, _ = app.refresh(None)
    assert "canary v2 on 10% of new conversations beside v1" in heading
    assert "v2 0.75 [" in heading and "of 40" in heading and "v1 0.50 [" in heading
    assert list(frame.columns) == trials_view.TRIAL_COLUMNS
    row = frame.values.tolist()[0]
    assert row[:6] == [trial["id"], "canary", "v2", "v1", "10%", "running"]
    assert row[6].startswith("0.75 [") and row[8].startswith("+0.25 [") and row[9] == "undecided"
    store.reject_canary(trial["id"], reason="worse than v1 on live thumbs", evidence={})
    *_, heading, frame, _, _, _ = app.refresh(None)
    assert heading == "### Live trials\nwatching v1 against v0: v1 no thumbs yet, v0 no thumbs yet"
    assert frame.values.tolist()[0][5:] == ["rejected", "no thumbs yet", "no thumbs yet", "",
                                            "worse than v1 on live thumbs"]


def test_plots_handler(app):
    thumbs, approval, versions = app.plots("day")
    assert thumbs["count"].sum() == 7 and len(approval) == 1
    assert set(versions["version"]) == {"v0", "v1"}
    thumbs, _, _ = app.plots("fortnight")  # an unknown bucket falls back rather than failing
    assert thumbs["count"].sum() == 7


def test_promote_and_roll_back(app, ops):
    said = app.promote("v2")
    assert ops.store.active_version() == "v2"
    assert "Promoted v2 (was v1)" in said and "Now serving v2" in said
    assert ops.follower.policy.version == "v2"
    said = app.rollback(console.PREVIOUS)
    assert ops.store.active_version() == "v1"
    assert "Rolled back to v1" in said


def test_promote_an_unknown_version_is_refused_not_raised(app, ops):
    said = app.promote("v9")
    assert said.startswith("**Refused:**") and "no adapter" in said
    assert ops.store.active_version() == "v1"
    assert app.promote(None).startswith("**Refused:**")


def test_promote_or_roll_back_to_a_broken_adapter_is_refused_and_changes_nothing(app, ops):
    (Path(ops.store.get_adapter("v2")["path"]) / "BROKEN").touch()
    said = app.promote("v2")
    assert said.startswith("**Refused:**") and "marked broken; v1 stays active" in said
    said = app.rollback("v2")
    assert said.startswith("**Refused:**") and "marked broken" in said
    assert ops.store.active_version() == "v1" and ops.follower.policy.version == "v1"
    assert [a["version"] for a in ops.store.activations()] == ["v1"]


def test_rollback_with_nothing_before_is_refused(store):
    ops = Operations(store, VersionFollower(StubPolicy(), store), StubScheduler(store))
    said = console.Console(ops).rollback(console.PREVIOUS)
    assert said.startswith("**Refused:**") and "nothing to roll back to" in said


def test_retrain_reports_start_and_refusal(app, ops):
    assert "started in process 4242" in app.retrain("kto")
    assert ops.scheduler.started == [("kto", "operator")]
    said = app.retrain("sft")
    assert said.startswith("**Refused:**") and "unknown method" in said


def test_pause_and_resume_flip_the_flag(app, ops):
    assert app.pause() == "Schedule paused."
    assert ops.store.get_setting("schedule_paused") is True
    assert ops.status()["schedule_paused"] is True
    assert app.resume() == "Schedule running."
    assert ops.store.get_setting("schedule_paused") is False
