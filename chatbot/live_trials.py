"""Deciding live trials on live thumbs: the canary and the watch.

`LiveJudge.look` (run by the version follower's thread, every few
seconds) takes each running trial (`storage.trials`), reads its thumbs and
applies the sequential test of `online_rl.sequential`:

- **canary** (the candidate, on its share of new conversations, against the
  active version over the same period): *not worse* promotes it (an
  activation row ``canary`` with the evidence); *worse* rejects it (a
  ``canary_reject`` row with the evidence), and it stops serving.
- **watch** (after any promotion, the new version against the thumbs of
  the version before it, its last `history` thumbs before the promotion):
  *worse* rolls back to that version by itself (a ``rollback`` row by
  ``watch`` with the evidence); *not worse* ends the watch as passed.

Undecided trials keep their latest evidence in the store, for the console
and ``app.py status``. Several serving processes may look at once: a trial
is ended only while it is still running, and a promotion of a version
already active changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from chatbot import promotion
from chatbot.adapters import AdapterLoadError
from online_rl.sequential import NOT_WORSE, WORSE, compare
from storage import Store, StoreError

log = logging.getLogger("chatbot.live_trials")


@dataclass
class TrialSettings:
    confidence: float = 0.95  # 1 - the chance of ever deciding wrongly, however long a trial runs
    margin: float = 0.05  # "not worse": at most this much lower approval
    watch: bool = True  # watch every promotion and roll back on a significant fall
    history: int = 1000  # the version before's most recent thumbs a watch compares with

    def validate(self) -> "TrialSettings":
        if not 0.5 <= self.confidence < 1:
            raise ValueError("--canary-confidence is between 0.5 and 1 (e.g. 0.95)")
        if not 0 <= self.margin < 0.5:
            raise ValueError("--canary-margin is a difference of approvals between 0 and 0.5 (e.g. 0.05)")
        return self


class LiveJudge:
    def __init__(self, store: Store, check: promotion.Check, settings: TrialSettings | None = None):
        self.store, self.check = store, check
        self.settings = (settings or TrialSettings()).validate()
        self._seen: dict[int, tuple] = {}  # trial id -> thumb counts at its last recorded look

    def look(self) -> list[dict]:
        """Decide every running trial that can be decided; return the decisions."""
        decisions = []
        for trial in self.store.running_trials():
            if trial["kind"] == "watch" and not self.settings.watch:
                continue
            try:
                decision = self._look_at(trial)
            except (StoreError, AdapterLoadError) as exc:
                self.store.end_trial(trial["id"], "failed", reason=str(exc))
                log.error("live trial %s of %s failed: %s", trial["id"], trial["version"], exc)
                continue
            if decision:
                decisions.append(decision)
        return decisions

    def _look_at(self, trial: dict) -> dict | None:
        version, other = trial["version"], trial["other"]
        new = self.store.live_thumbs(version, since=trial["started_at"])
        if trial["kind"] == "canary":
            old = self.store.live_thumbs(other, since=trial["started_at"])
        else:
            old = self.store.live_thumbs(other, before=trial["started_at"], last=self.settings.history)
        evidence = compare(new, old, alpha=1 - self.settings.confidence, margin=self.settings.margin)
        evidence["trial"] = trial["id"]
        verdict = evidence["verdict"]
        words = _words(evidence, version, other)
        if trial["kind"] == "canary" and verdict == NOT_WORSE:
            promotion.promote(self.store, version, self.check, actor="canary", action="canary",
                              reason=f"not worse than {other} on live thumbs: {words}", evidence=evidence)
        elif trial["kind"] == "canary" and verdict == WORSE:
            self.store.reject_canary(trial["id"], reason=f"worse than {other} on live thumbs: {words}",
                                     evidence=evidence)
        elif verdict == WORSE:  # a watch: the promoted version does worse than the one before
            if self.store.active_version() != version:  # promoted past since this look began: not ours to undo
                return None
            promotion.rollback(self.store, other, self.check, actor="watch",
                               reason=f"approval fell after its promotion: {words}", evidence=evidence)
        elif verdict == NOT_WORSE:
            self.store.end_trial(trial["id"], "passed", reason=f"not worse than {other}: {words}",
                                 evidence=evidence)
        else:
            counts = (len(new), len(old))
            if self._seen.get(trial["id"]) != counts:
                self._seen[trial["id"]] = counts
                self.store.record_evidence(trial["id"], evidence)
            return None
        self._seen.pop(trial["id"], None)
        log.info("%s %s of %s against %s: %s (%s)", trial["kind"], trial["id"], version, other, verdict, words)
        return {"trial": trial["id"], "kind": trial["kind"], "version": version, "other": other,
                "verdict": verdict, "evidence": evidence}


def _words(evidence: dict, version: str, other: str) -> str:
    new, old, diff = evidence["new"], evidence["other"], evidence["difference"]
    return (f"{version} {_share(new['approval'])} of {new['thumbs']} thumbs up, {other} {_share(old['approval'])} "
            f"of {old['thumbs']}; difference in [{diff['low']:+.2f}, {diff['high']:+.2f}] at "
            f"{evidence['confidence']:.0%} confidence")


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
