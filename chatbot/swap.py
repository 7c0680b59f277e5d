"""Keeps the serving model on the version the registry says is active.

The `adapters` table is the truth: a promotion or rollback made from the
command line, the operator API or a retrain's gate is a change in the
database, and every serving process follows it. `VersionFollower.sync` reads
the active version and, when it differs from what serves, hot-swaps it in
(`Policy.swap_to`). At start it runs once before the server takes requests,
so a restart comes up on the recorded version; then a thread repeats it every
`interval_s` seconds.

A version that cannot be loaded (files gone, a different base) is not retried
until the active version changes again; the previous version keeps serving,
and the error is kept for the operator status and logged.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from chatbot.policy import AdapterLoadError, Policy
from storage import Store

log = logging.getLogger("chatbot.swap")


class VersionFollower:
    def __init__(self, policy: Policy, store: Store, *, interval_s: float = 2.0):
        self.policy = policy
        self.store = store
        self.interval_s = interval_s
        self.error: dict | None = None  # the last version that could not be loaded, and why
        self.swaps: list[dict] = []  # recent swaps with their timings, newest last
        self._lock = threading.Lock()  # the polling thread and an operator's request may sync at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> dict | None:
        """Swap to the active version if needed; return the swap's timings, or None."""
        with self._lock:
            return self._sync()

    def _sync(self) -> dict | None:
        wanted = self.store.active_version()
        if wanted == self.policy.version or (self.error and wanted == self.error["version"]):
            return None
        row = self.store.get_adapter(wanted) if wanted != "v0" else None
        try:
            info = self.policy.swap_to(wanted, row["path"] if row else None)
        except AdapterLoadError as exc:
            self.error = {"version": wanted, "error": str(exc), "at": _now(),
                          "serving": self.policy.version}
            log.error("could not switch to %s, still serving %s: %s", wanted, self.policy.version, exc)
            return None
        self.error = None
        info["at"] = _now()
        self.swaps = [*self.swaps[-49:], info]
        log.info("now serving %s (was %s): swapped in %.3f s", info["version"], info["previous"], info["total_s"])
        return info

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
                self.sync()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop following
                log.exception("checking the active version failed")

    def state(self) -> dict:
        return {"serving_version": self.policy.version, "error": self.error,
                "last_swap": self.swaps[-1] if self.swaps else None, "swaps": len(self.swaps)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
