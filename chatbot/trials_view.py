"""The console's view of live trials (`storage.trials`): each canary and
watch with both arms' live approval and their confidence intervals."""

from __future__ import annotations

import pandas as pd

TRIAL_COLUMNS = ["trial", "kind", "version", "against", "share", "status", "version approval", "against approval",
                 "difference", "decision"]


def arm_text(arm: dict | None) -> str:
    """'0.62 [0.41, 0.80] of 34': approval, its interval, the thumbs it is from."""
    if not arm or not arm.get("thumbs"):
        return "no thumbs yet"
    return f"{arm['approval']:.2f} [{arm['low']:.2f}, {arm['high']:.2f}] of {arm['thumbs']}"


def difference_text(evidence: dict) -> str:
    diff = evidence.get("difference")
    if not diff:
        return ""
    estimate = "n/a" if diff.get("estimate") is None else f"{diff['estimate']:+.2f}"
    return f"{estimate} [{diff['low']:+.2f}, {diff['high']:+.2f}] at {evidence.get('confidence', 0):.0%}"


def trials_frame(trials: list[dict]) -> pd.DataFrame:
    rows = []
    for t in trials:
        evidence = t.get("evidence") or {}
        decision = t.get("reason") or ""
        if t.get("status") == "running":
            decision = evidence.get("verdict", "waiting for thumbs")
        rows.append([t["id"], t["kind"], t["version"], t["other"],
                     f"{t['share']:.0%}" if t.get("share") else "all", t["status"],
                     arm_text(evidence.get("new")), arm_text(evidence.get("other")), difference_text(evidence),
                     decision])
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def trials_markdown(trials: list[dict]) -> str:
    running = [t for t in trials if t.get("status") == "running"]
    if not running:
        return "### Live trials\nNone running: a canary starts when a candidate passes the gate with `--canary`; " \
               "a watch after every promotion."
    words = []
    for t in running:
        evidence = t.get("evidence") or {}
        what = (f"canary {t['version']} on {t['share']:.0%} of new conversations beside {t['other']}"
                if t["kind"] == "canary" else f"watching {t['version']} against {t['other']}")
        words.append(f"{what}: {t['version']} {arm_text(evidence.get('new'))}, "
                     f"{t['other']} {arm_text(evidence.get('other'))}")
    return "### Live trials\n" + "  \n".join(words)
