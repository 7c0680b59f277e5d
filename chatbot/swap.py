"""Keeps the serving model on the version the registry says is active.

The `adapters` table is the truth: a promotion or rollback made from the
command line, the operator API or a retrain's gate is a change in the
database, and every serving process follows it. `VersionFollower.sync` reads
the active version and, when it differs from what serves, hot-swaps it in
(`Policy.swap_to`); a thread repeats it every `interval_s` seconds.

A version that cannot be loaded (its files fail the check of
`chatbot.adapters`, or it was trained on another base) leaves the previous
version serving. The reason is logged once and kept for the operator status;
the version is not tried again while its files stay as they are (rewritten
files are tried at the next poll) or until the active version changes.

It also keeps the canary arm on the trial the registry says runs
(`storage.trials`): a candidate on canary is loaded beside the serving
version, and unloaded when its trial ends; one whose files do not load ends
its trial as failed. With a `judge` (`chatbot.live_trials`), each poll first
lets it decide the running trials on live thumbs.

At start (`come_up`, before the server takes requests) the follower swaps in
the active version; when that version does not load, the server comes up on
the last version that does (the versions active before it, most recently
active first, then v0) and records that as a ``fallback`` activation with
the reason, so the registry says again what serves. No file in the registry
stops a server from starting. A server started on another base than the
active version's comes up the same way but records nothing: the version is
sound for a server on its own base, and this one must not change the
registry for every other.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from chatbot.adapters import AdapterLoadError, OtherBase, fingerprint
from chatbot.policy import Policy
from storage import Store

log = logging.getLogger("chatbot.swap")


class VersionFollower:
    def __init__(self, policy: Policy, store: Store, *, interval_s: float = 2.0, judge=None):
        self.policy = policy
        self.store = store
        self.judge = judge  # a chatbot.live_trials.LiveJudge, or None
        self.interval_s = interval_s
        self.error: dict | None = None  # the active version that could not be loaded, and why
        self.fallback: dict | None = None  # the fallback this process made at start, if any
        self.swaps: list[dict] = []  # recent swaps with their timings, newest last
        self._failed_files: tuple = ()  # the files of `error`'s version when they failed
        self._lock = threading.Lock()  # the polling thread and an operator's request may sync at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> dict | None:
        """Swap to the active version if needed, then follow the canary;
        return the swap's timings, or None."""
        with self._lock:
            info = self._sync()
            self._sync_canary()
            return info

    def _sync_canary(self) -> None:
        trial = self.store.running_canary()
        serving = self.policy.canary
        if serving is not None and (trial is None or serving.trial != trial["id"]):
            self.policy.end_canary()
            log.info("canary of %s ended", serving.version)
        if trial is None or (serving is not None and serving.trial == trial["id"]):
            return
        try:
            self.policy.start_canary(trial["id"], trial["version"], self._path(trial["version"]), trial["share"])
        except Exception as exc:  # noqa: BLE001 - the serving version goes on alone
            self.store.end_trial(trial["id"], "failed", reason=f"does not load: {exc}")
            log.error("canary of %s does not load: %s", trial["version"], exc)
            return
        log.info("canary: %s serves %.0f%% of new conversations beside %s", trial["version"],
                 100 * trial["share"], self.policy.version)

    def come_up(self) -> dict | None:
        """At start: serve the active version, or fall back to the last version
        that loads. Returns the fallback's activation, or None."""
        with self._lock:
            self._sync()
            return self._fall_back() if self.error else None

    def _sync(self) -> dict | None:
        wanted = self.store.active_version()
        if wanted == self.policy.version:
            self.error = None
            return None
        path = self._path(wanted)
        files = fingerprint(path)
        if self.error and self.error["version"] == wanted and files == self._failed_files:
            return None  # these very files failed already, and why was logged
        try:
            info = self._swap(wanted, path)
        except Exception as exc:  # noqa: BLE001 - whatever a file does, the old version keeps serving
            self.error = {"version": wanted, "error": str(exc), "at": _now(), "serving": self.policy.version,
                          "other_base": isinstance(exc, OtherBase)}
            self._failed_files = files
            log.error("could not switch to %s, still serving %s: %s", wanted, self.policy.version, exc,
                      exc_info=not isinstance(exc, AdapterLoadError))
            return None
        self.error = None
        log.info("now serving %s (was %s): swapped in %.3f s", info["version"], info["previous"], info["total_s"])
        return info

    def _fall_back(self) -> dict | None:
        broken, why = self.error["version"], self.error["error"]
        for version in self.store.earlier_versions():
            if version == broken:
                continue
            if version != self.policy.version:
                try:
                    self._swap(version, self._path(version))
                except Exception as exc:  # noqa: BLE001 - try the one before
                    log.warning("falling back: %s does not load either: %s", version, exc)
                    continue
            if self.error["other_base"]:
                self.error["serving"] = self.policy.version
                log.warning("%s; came up on %s, the last version that loads on this base (the registry is left "
                            "as it is)", why, version)
                return None
            reason = f"{broken} does not load: {why}"
            result = self.store.fall_back(broken, version, reason=reason)
            self.error = None
            if result is None:  # another process changed the active version meanwhile: follow it
                self._sync()
                return None
            self.fallback = {**result, "reason": reason, "at": _now()}
            log.warning("%s; came up on %s, the last version that loads (recorded as a fallback)", why, version)
            return result
        return None

    def _swap(self, version: str, path: str | None) -> dict:
        info = self.policy.swap_to(version, path)
        info["at"] = _now()
        self.swaps = [*self.swaps[-49:], info]
        return info

    def _path(self, version: str) -> str | None:
        row = self.store.get_adapter(version) if version != "v0" else None
        return row["path"] if row else None

    def start(self) -> "VersionFollower":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="version-follower")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.judge is not None:
                    self.judge.look()
                self.sync()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop following
                log.exception("checking the active version failed")

    def state(self) -> dict:
        canary = self.policy.canary
        return {"serving_version": self.policy.version, "error": self.error, "fallback": self.fallback,
                "canary": None if canary is None else {"version": canary.version, "share": canary.share,
                                                       "trial": canary.trial},
                "last_swap": self.swaps[-1] if self.swaps else None, "swaps": len(self.swaps)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
