"""A bound on how fast one rater may give thumbs.

A person reads a reply before rating it; thumbs arriving faster than that
come from a script. `RateLimit` keeps, per rater (`chatbot.identity`), the
times of their last `per_minute` thumbs: one more within a minute of the
oldest of them is refused, with how long to wait. The page and the API share
one `RateLimit`, so a rater's thumbs count the same wherever they come from.

Memory is bounded: at most `max_tracked` raters are remembered, each with at
most `per_minute` times; past that the rater not heard from for longest is
forgotten (and starts afresh if they come back).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque

DEFAULT_PER_MINUTE = 30
DEFAULT_MAX_TRACKED = 4096
WINDOW_S = 60.0


class RateLimit:
    def __init__(self, per_minute: int = DEFAULT_PER_MINUTE, *, max_tracked: int = DEFAULT_MAX_TRACKED,
                 clock=time.monotonic):
        if not isinstance(per_minute, int) or per_minute < 0:
            raise ValueError("--max-thumbs-per-minute must be a whole number, 0 to turn the limit off")
        if max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self.per_minute, self.max_tracked, self.clock = per_minute, max_tracked, clock
        self._recent: OrderedDict[str, deque] = OrderedDict()  # least recently heard from first
        self._lock = threading.Lock()
        self.refused = 0  # thumbs refused since the start (a metric)

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def tracked(self) -> int:
        return len(self._recent)

    def take(self, key: str) -> float | None:
        """Count one thumb from `key` and return None, or, when it is over
        the limit, count nothing and return the seconds until one more is allowed."""
        if not self.enabled:
            return None
        now = self.clock()
        with self._lock:
            times = self._recent.get(key)
            if times is None:
                times = self._recent[key] = deque(maxlen=self.per_minute)
            self._recent.move_to_end(key)  # now the most recently heard from
            if len(times) == self.per_minute and now - times[0] < WINDOW_S:
                self.refused += 1
                return WINDOW_S - (now - times[0])
            times.append(now)
            while len(self._recent) > self.max_tracked:
                self._recent.popitem(last=False)
            return None


def retry_after(seconds: float) -> str:
    """The ``Retry-After`` header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
