"""The operator console: one Gradio page, mounted at ``/admin`` behind a login.

From the top: a status line (active and serving version, the schedule,
feedback totals and approval); the retrain in progress, live, with its stage,
message and a progress bar during PPO, or the last run's outcome when none is
running; the controls (retrain now, promote, roll back, pause and resume the
schedule) with a line saying what happened or why it was refused; plots of
thumbs and approval over time and approval per version; the runs and the
adapters as tables; and the raters who hold the most of the last run's data,
with their share before and after the rater bound.

Everything is read from and done through `chatbot.admin.Operations`, the same
object behind the operator API. A timer refreshes the status, progress and
tables every few seconds and the plots less often. The functions that turn
the store's rows into what the page shows are plain functions of their input
(`status_markdown`, `progress_html`, `runs_frame`, ...); `Console` holds the
event handlers and `build_console` wires them. Text from the database (run
errors, gate reasons) is escaped before it is shown.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone

import gradio as gr
import pandas as pd

from chatbot.admin import OperationError, Operations
from chatbot.trials_view import trials_frame, trials_markdown
from online_rl import METHODS

BUCKETS = ("minute", "hour", "day")
DEFAULT_BUCKET = "hour"
REFRESH_S = 3.0  # status, progress, tables
PLOT_REFRESH_S = 15.0  # plots: one query over all feedback each time
RUNS_SHOWN = 20
ERROR_CHARS = 200  # a run's error in the table; the full text is in `app.py status`
PREVIOUS = ""  # the rollback target meaning "what was active before"

RUN_COLUMNS = ["run", "method", "status", "started", "seconds", "version", "gate", "win rate", "judge",
               "KL/token", "base NLL (base's), excess", "reward AUC", "error"]
ADAPTER_COLUMNS = ["version", "status", "reason", "run", "created"]
VERSION_COLUMNS = ["version", "replies", "up", "down", "approval"]
SHARE_COLUMNS = ["data", "rater", "rows", "share before", "share after"]
SHARE_DATA = (("thumbs", "reward model's thumbs"), ("prompts", "PPO's prompts"))
# Gradio Markdown is not only HTML: these would format text that should be shown as is.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-!|~>])")


# -- text -------------------------------------------------------------------------------


def md_text(value) -> str:
    """Any value as Markdown that shows exactly its text."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(str(value), quote=False))


def clip(text: str | None, limit: int = ERROR_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def share_text(value: float | None) -> str:
    """A share of the data to a tenth of a percent: the bound is often a few percent."""
    return "–" if value is None else f"{100 * value:.1f}%"


def short_time(stamp: str | None) -> str:
    """``2024-05-01T12:34:56.789+00:00`` as ``2024-05-01 12:34:56`` (UTC)."""
    return (stamp or "")[:19].replace("T", " ")


def seconds_since(stamp: str | None, now: datetime | None = None) -> float | None:
    try:
        then = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return ((now or datetime.now(timezone.utc)) - then).total_seconds()


# -- the status line ----------------------------------------------------------------------


def overall_approval(by_version: list[dict]) -> tuple[int, int, float | None]:
    """Thumbs up and down over every version (each rater's latest vote), and the approval."""
    up = sum(r.get("up") or 0 for r in by_version)
    down = sum(r.get("down") or 0 for r in by_version)
    return up, down, (up / (up + down) if up + down else None)


def schedule_text(schedule: dict | None, paused: bool = False) -> str:
    schedule = schedule or {}
    if not schedule.get("enabled", True):
        return "off (retrain by hand only)"
    if schedule.get("cron"):
        when = f"cron {md_text(schedule['cron'])}"
    elif schedule.get("every_s"):
        when = f"every {schedule['every_s']:g} s"
    else:
        when = "on"
    parts = [("**paused**, " if schedule.get("paused", paused) else "") + when]
    if schedule.get("method"):
        parts.append(f"method {md_text(schedule['method'])}")
    if schedule.get("next_check_at") and not schedule.get("paused", paused):
        parts.append(f"next check {md_text(short_time(schedule['next_check_at']))}")
    if schedule.get("min_new_feedback") is not None:
        parts.append(f"new feedback {schedule.get('new_feedback', 0)} of {schedule['min_new_feedback']} needed")
    return ", ".join(parts)


def status_markdown(status: dict) -> str:
    """The status line: versions, schedule, feedback."""
    serving = status.get("serving") or {}
    active = status.get("active_version", "v0")
    serving_version = serving.get("serving_version")
    versions = f"**Active** {md_text(active)} · **serving** {md_text(serving_version or 'unknown')}"
    if serving_version and serving_version != active and not serving.get("error"):
        versions += " (switching)"
    error = serving.get("error")
    if error:
        versions += (f" · **could not load {md_text(error.get('version', '?'))}:** "
                     f"{md_text(clip(error.get('error')))}")
    fallback = serving.get("fallback")
    if fallback:
        versions += (f" · **came up on {md_text(fallback.get('active', '?'))} instead of "
                     f"{md_text(fallback.get('previous', '?'))}:** {md_text(clip(fallback.get('reason')))}")
    thumbs = status.get("feedback_by_value") or {}
    up, down, approval = overall_approval(status.get("approval_by_version") or [])
    feedback = (f"**Feedback** {status.get('feedback', 0)} thumbs recorded on {status.get('responses', 0)} "
                f"replies ({thumbs.get('up', 0)} up, {thumbs.get('down', 0)} down, "
                f"{thumbs.get('withdrawn', 0)} withdrawn) · **approval** {percent(approval)} "
                f"of the latest votes ({up} up, {down} down) · "
                f"{status.get('new_feedback_since_last_run', 0)} new since the last run")
    schedule = "**Schedule** " + schedule_text(status.get("schedule"), bool(status.get("schedule_paused")))
    return f"{versions}  \n{schedule}  \n{feedback}"


# -- the retrain in progress ------------------------------------------------------------------


def running_run(runs: list[dict]) -> dict | None:
    return next((r for r in runs if r.get("status") == "running"), None)


def progress_bar(step: int, of: int) -> str:
    share = max(0.0, min(1.0, step / of)) if of else 0.0
    return (f'<div class="retrain-bar" style="background:#e5e7eb;border-radius:4px;height:12px;width:100%">'
            f'<div style="background:#f97316;border-radius:4px;height:12px;width:{100 * share:.1f}%"></div>'
            f"</div><div>step {int(step)} of {int(of)}</div>")


def progress_html(run: dict | None, last: dict | None = None, now: datetime | None = None) -> str:
    """The running run (a `run_summary`), live; or, with none running, `last`'s outcome."""
    if run is None or run.get("status") != "running":
        return f"<p><b>No retrain running.</b> {outcome_html(last or run)}</p>"
    progress = run.get("progress") or {}
    method = html.escape(str(run.get("kind") or "?"))
    stage = html.escape(str(progress.get("stage") or "starting"))
    lines = [f"<p><b>Run {int(run['id'])} ({method}) is running</b>, stage <b>{stage}</b>"]
    elapsed = progress.get("elapsed_s")
    running_for = seconds_since(run.get("started_at"), now)
    times = []
    if elapsed is not None:
        times.append(f"{float(elapsed):.1f} s elapsed at its last report")
    if running_for is not None:
        times.append(f"started {running_for:.0f} s ago")
    if times:
        lines.append(" (" + ", ".join(times) + ")")
    lines.append("</p>")
    if progress.get("message"):
        lines.append(f"<p><code>{html.escape(str(progress['message']))}</code></p>")
    if progress.get("step") is not None and progress.get("of"):
        lines.append(progress_bar(progress["step"], progress["of"]))
    return "".join(lines)


def outcome_html(run: dict | None) -> str:
    """One sentence on how a finished run ended."""
    if run is None:
        return "No run yet."
    head = (f"Last run {int(run['id'])} ({html.escape(str(run.get('kind')))}) "
            f"{html.escape(str(run.get('status')))} at {html.escape(short_time(run.get('finished_at')))}")
    if run.get("status") != "succeeded":
        return f"{head}: {html.escape(clip(run.get('error')) or 'no error recorded')}"
    gate = run.get("gate")
    version = html.escape(str(run.get("version") or "no version"))
    if not gate:
        return f"{head}: {version} is a candidate."
    verdict = "promoted" if gate.get("passed") else "not promoted"
    return f"{head}: {version} {verdict} ({html.escape(clip(gate.get('reason')))})."


# -- tables ---------------------------------------------------------------------------------


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def _nll(run: dict) -> str:
    """The base model's NLL per token of the candidate's replies, beside that
    of the base's own, and the excess over the base's own choices that the
    gate bounds (`online_rl.language`)."""
    nll, base, excess = run.get("base_nll"), run.get("base_nll_of_base"), run.get("excess_nll")
    if nll is None:
        return ""
    text = f"{nll:.3f} ({base:.3f})" if base is not None else f"{nll:.3f}"
    return text if excess is None else f"{text}, excess {excess:+.3f}"


def gate_text(gate: dict | None) -> str:
    if not gate:
        return ""
    return ("passed" if gate.get("passed") else "failed") + (f": {gate['reason']}" if gate.get("reason") else "")


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """The runs table, newest first, from `run_summary` rows."""
    rows = [[
        r["id"], r.get("kind"), r.get("status"), short_time(r.get("started_at")), _round(r.get("seconds"), 1),
        r.get("version") or "", clip(gate_text(r.get("gate")), 120), _round(r.get("win_rate")),
        _round(r.get("judge_win_rate")), _round(r.get("kl_per_token")), _nll(r), _round(r.get("reward_auc")),
        clip(r.get("error")),
    ] for r in runs]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def adapters_frame(adapters: list[dict]) -> pd.DataFrame:
    """The adapters table, newest version first."""
    rows = [[a["version"], a.get("status"), a.get("reason") or "", a.get("run_id"), short_time(a.get("created_at"))]
            for a in reversed(adapters)]
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def rater_shares_frame(shares: dict | None) -> pd.DataFrame:
    """The top raters of the last run's data (`Store.last_rater_shares`):
    their rows and their share of the weight before and after the bound."""
    rows = []
    for key, label in SHARE_DATA:
        for r in ((shares or {}).get(key) or {}).get("top") or []:
            rows.append([label, r["rater"], r["rows"], share_text(r["share_before"]), share_text(r["share_after"])])
    return pd.DataFrame(rows, columns=SHARE_COLUMNS)


def rater_shares_markdown(shares: dict | None) -> str:
    """The heading of that table: which run, and the bound."""
    if not shares:
        return "### Rater shares\nNo run has read the feedback yet."
    thumbs = shares.get("thumbs") or {}
    return (f"### Rater shares (run {int(shares['run_id'])})\nNo rater holds more than "
            f"{share_text(thumbs.get('bound', shares.get('max_rater_share')))} of the reward model's thumbs "
            f"({thumbs.get('raters', 0)} raters, {thumbs.get('rows', 0)} thumbs) or of PPO's prompts; "
            "a rater above it keeps every row, down-weighted.")


def version_choices(adapters: list[dict]) -> list[tuple[str, str]]:
    """Versions to promote: the adapters, newest first, labelled with their status, then the base."""
    choices = [(f"{a['version']} ({a.get('status')})", a["version"]) for a in reversed(adapters)]
    return choices + [("v0 (the base)", "v0")]


def rollback_choices(adapters: list[dict]) -> list[tuple[str, str]]:
    return [("the version before the active one", PREVIOUS), *version_choices(adapters)]


# -- plots ------------------------------------------------------------------------------------


def bucket_times(buckets: list[str]) -> pd.Series:
    """Bucket labels (``2024-05-01T12`` for an hour) as datetimes, so the plot's x axis is time."""
    return pd.Series(pd.to_datetime(pd.Series(buckets, dtype="object"), format="ISO8601"), dtype="datetime64[ns]")


def timeline_frames(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From `feedback_timeline` rows: thumbs per bucket (long form: time, thumb,
    count) and approval per bucket (time, approval, votes)."""
    times = bucket_times([r["bucket"] for r in rows])
    ups = [int(r["up"] or 0) for r in rows]
    downs = [int(r["down"] or 0) for r in rows]
    thumbs = pd.DataFrame({
        "time": pd.concat([times, times], ignore_index=True),
        "thumb": pd.Series(["up"] * len(rows) + ["down"] * len(rows), dtype="object"),
        "count": pd.Series(ups + downs, dtype="int64"),
    })
    approval = pd.DataFrame({
        "time": times,
        "approval": pd.Series([float(r["approval"]) for r in rows], dtype="float64"),
        "votes": pd.Series([u + d for u, d in zip(ups, downs)], dtype="int64"),
    })
    return thumbs, approval


def versions_frame(rows: list[dict]) -> pd.DataFrame:
    """Approval per model version (`approval_by_version`), versions without votes left out of the plot."""
    voted = [r for r in rows if r.get("approval") is not None]
    return pd.DataFrame({
        "version": pd.Series([r["version"] for r in voted], dtype="object"),
        "approval": pd.Series([float(r["approval"]) for r in voted], dtype="float64"),
        "votes": pd.Series([int(r["up"]) + int(r["down"]) for r in voted], dtype="int64"),
    })


def versions_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[r["version"], r["replies"], r["up"], r["down"], percent(r["approval"])] for r in rows],
                        columns=VERSION_COLUMNS)


# -- handlers ------------------------------------------------------------------------------------


def _actor(request: gr.Request | None) -> str:
    user = getattr(request, "username", None) if request is not None else None
    return f"{user} (console)" if user else "operator (console)"


def refused(exc: OperationError) -> str:
    return f"**Refused:** {md_text(exc)}"


class Console:
    """The console's handlers; every one reads or acts through `ops`."""

    def __init__(self, ops: Operations):
        self.ops = ops

    def refresh(self, shown_choices: list | None = None):
        """Status line, progress, tables and, when they changed, the version choices.

        The dropdowns are only updated when the versions change, so that a
        refresh does not close one the operator has open."""
        status = self.ops.status(runs=RUNS_SHOWN)
        runs, adapters = status["recent_runs"], status["adapters_by_version"]
        current = running_run(runs)
        choices = [list(c) for c in version_choices(adapters)]
        if choices == shown_choices:
            promote_update = rollback_update = gr.skip()
        else:
            promote_update = gr.Dropdown(choices=version_choices(adapters))
            rollback_update = gr.Dropdown(choices=rollback_choices(adapters))
        shares, trials = status.get("rater_shares"), status.get("live_trials") or []
        return (status_markdown(status), progress_html(current, runs[0] if runs else None), runs_frame(runs),
                adapters_frame(adapters), versions_table(status["approval_by_version"]),
                rater_shares_markdown(shares), rater_shares_frame(shares), trials_markdown(trials),
                trials_frame(trials), promote_update, rollback_update, choices)

    def plots(self, bucket: str):
        bucket = bucket if bucket in BUCKETS else DEFAULT_BUCKET
        thumbs, approval = timeline_frames(self.ops.store.feedback_timeline(bucket))
        return thumbs, approval, versions_frame(self.ops.store.approval_by_version())

    def retrain(self, method: str) -> str:
        try:
            started = self.ops.retrain(method or METHODS[0])
        except OperationError as exc:
            return refused(exc)
        pid = started.get("pid") if isinstance(started, dict) else None
        return f"Retrain ({md_text(method)}) started" + (f" in process {pid}." if pid else ".")

    def promote(self, version: str | None, request: gr.Request = None) -> str:
        if not version:
            return "**Refused:** choose a version to promote."
        try:
            result = self.ops.promote(version, actor=_actor(request))
        except OperationError as exc:
            return refused(exc)
        if not result.get("changed", True):
            return f"{md_text(version)} is already the active version."
        return f"Promoted {md_text(result['active'])} (was {md_text(result['previous'])})." + serving_note(result)

    def rollback(self, to: str | None, request: gr.Request = None) -> str:
        try:
            result = self.ops.rollback(to or None, actor=_actor(request))
        except OperationError as exc:
            return refused(exc)
        said = f"Rolled back to {md_text(result['active'])} (from {md_text(result['previous'])})."
        return said + serving_note(result)

    def pause(self) -> str:
        return self._schedule("pause")

    def resume(self) -> str:
        return self._schedule("resume")

    def _schedule(self, action: str) -> str:
        try:
            state = self.ops.schedule(action)
        except OperationError as exc:
            return refused(exc)
        return f"Schedule {'paused' if state.get('paused') else 'running'}."

    # -- the page ----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Learning chatbot: operator console", analytics_enabled=False) as demo:
            gr.Markdown("## Operator console")
            status = gr.Markdown("Loading…", elem_id="console-status")
            progress = gr.HTML("", elem_id="console-progress")
            with gr.Row():
                with gr.Column():
                    method = gr.Radio(list(METHODS), value=METHODS[0], label="Method")
                    retrain = gr.Button("Retrain now", variant="primary", elem_id="retrain")
                with gr.Column():
                    version = gr.Dropdown(version_choices([]), value=None, label="Version to promote")
                    promote = gr.Button("Promote", elem_id="promote")
                with gr.Column():
                    target = gr.Dropdown(rollback_choices([]), value=PREVIOUS, label="Roll back to")
                    rollback = gr.Button("Roll back", variant="stop", elem_id="rollback")
                with gr.Column():
                    pause = gr.Button("Pause schedule", elem_id="pause")
                    resume = gr.Button("Resume schedule", elem_id="resume")
            result = gr.Markdown("", elem_id="console-result")
            with gr.Row():
                bucket = gr.Radio(list(BUCKETS), value=DEFAULT_BUCKET, label="Time bucket")
            with gr.Row():
                thumbs_plot = gr.LinePlot(x="time", y="count", color="thumb", title="Thumbs over time",
                                          color_map={"up": "#16a34a", "down": "#dc2626"}, y_title="thumbs")
                approval_plot = gr.LinePlot(x="time", y="approval", title="Approval over time",
                                            y_lim=[0, 1], tooltip=["time", "approval", "votes"])
                version_plot = gr.BarPlot(x="version", y="approval", title="Approval per version",
                                          y_lim=[0, 1], sort="x", tooltip=["version", "approval", "votes"])
            gr.Markdown("### Runs")
            runs = gr.Dataframe(runs_frame([]), interactive=False, wrap=True, elem_id="console-runs")
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("### Adapters")
                    adapters = gr.Dataframe(adapters_frame([]), interactive=False, wrap=True)
                with gr.Column(scale=2):
                    gr.Markdown("### Approval per version")
                    versions = gr.Dataframe(versions_table([]), interactive=False)
            trials_heading = gr.Markdown(trials_markdown([]), elem_id="console-trials-heading")
            trials = gr.Dataframe(trials_frame([]), interactive=False, wrap=True, elem_id="console-trials")
            shares_heading = gr.Markdown(rater_shares_markdown(None), elem_id="console-shares-heading")
            shares = gr.Dataframe(rater_shares_frame(None), interactive=False, elem_id="console-shares")
            shown_choices = gr.State(None)

            fast, slow = gr.Timer(REFRESH_S), gr.Timer(PLOT_REFRESH_S)
            live = [status, progress, runs, adapters, versions, shares_heading, shares, trials_heading, trials,
                    version, target, shown_choices]
            plots = [thumbs_plot, approval_plot, version_plot]
            quiet = {"api_visibility": "private", "show_progress": "hidden"}
            refresh = dict(fn=self.refresh, inputs=[shown_choices], outputs=live, queue=False, **quiet)

            demo.load(**refresh)
            demo.load(self.plots, [bucket], plots, queue=False, **quiet)
            fast.tick(**refresh)
            slow.tick(self.plots, [bucket], plots, queue=False, **quiet)
            bucket.change(self.plots, [bucket], plots, queue=False, **quiet)
            retrain.click(self.retrain, [method], [result], api_visibility="private").then(**refresh)
            promote.click(self.promote, [version], [result], api_visibility="private").then(**refresh)
            rollback.click(self.rollback, [target], [result], api_visibility="private").then(**refresh)
            pause.click(self.pause, None, [result], api_visibility="private").then(**refresh)
            resume.click(self.resume, None, [result], api_visibility="private").then(**refresh)
        return demo


def serving_note(result: dict) -> str:
    if result.get("serving_error"):
        error = result["serving_error"]
        return (f" **Still serving {md_text(result.get('serving_version'))}:** "
                f"{md_text(clip(error.get('error') if isinstance(error, dict) else error))}")
    return f" Now serving {md_text(result.get('serving_version'))}." if result.get("serving_version") else ""


def build_console(ops: Operations) -> gr.Blocks:
    """The operator console's page; the server mounts it behind a login."""
    return Console(ops).build()
