"""Comparing two versions' live approval, looked at after every thumb.

A canary (a candidate on a share of new conversations beside the active
version) and the watch after a promotion (the new version against the one
before it) both ask one question of live thumbs, again and again as they
arrive: is the new version worse than the other, or not worse? A fixed-size
test looked at after every thumb would be wrong far more often than its
level says (the peeking problem), so each arm's approval gets a
**confidence sequence**: intervals that hold at every number of thumbs at
once, with probability at least 1 - alpha/2.

The sequence is the predictable plug-in empirical-Bernstein one of
Waudby-Smith & Ramdas ("Estimating means of bounded random variables by
betting", JRSS-B 2023, Theorem 2). Why this one: it is valid at 10 thumbs
as at 10,000 (not only asymptotically, which matters when a canary arm has
seen 30 thumbs), it needs nothing but that a thumb lies in [0, 1], and it
narrows with the arm's own variance, so an arm near 0 or 1 approval decides
sooner than a worst-case (Hoeffding) bound would. Two arms at alpha/2 each
(a union bound) give an interval for the difference of approvals that holds
at all times with probability at least 1 - alpha. Then:

- **worse**: the whole interval lies below 0 (the new version is worse);
- **not worse**: it lies above ``-margin`` (at most `margin` worse, the
  non-inferiority margin: a candidate that is as good need not prove it is
  better to be promoted);
- otherwise **undecided**: wait for more thumbs.

The chance of ever promoting a version worse than the margin, or of ever
rejecting one that is not worse, is at most alpha however long the test
runs. What it assumes: a thumb's chance of being up depends only on the
arm, not on what came before (thumbs of one conversation are not
independent; the per-rater rate limit bounds how much one person adds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

WORSE, NOT_WORSE, UNDECIDED = "worse", "not worse", "undecided"


@dataclass
class Interval:
    thumbs: int
    up: int
    approval: float | None  # the plain share of thumbs up
    low: float
    high: float


def confidence_sequence(values: Sequence[float], alpha: float, *, cap: float = 0.5) -> Interval:
    """The time-uniform interval for the mean of `values` (each in [0, 1],
    in the order they arrived) after all of them: it held after every one
    of them at once, with probability at least 1 - alpha."""
    if not 0 < alpha < 1:
        raise ValueError("alpha is a probability between 0 and 1")
    log_term = math.log(2 / alpha)
    low, high = 0.0, 1.0
    mean, var_sum = 0.5, 0.25  # the estimates before any thumb: mu_0 = 1/2, sigma^2_0 = 1/4
    weighted, weights, penalty, total = 0.0, 0.0, 0.0, 0.0
    for t, x in enumerate(values, start=1):
        x = float(x)
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"a value must lie in [0, 1], got {x}")
        variance = var_sum / t  # sigma^2_{t-1}: predictable, from the thumbs before this one
        lam = min(math.sqrt(2 * log_term / (variance * t * math.log(1 + t))), cap)
        penalty += (x - mean) ** 2 * (-math.log(1 - lam) - lam)  # v_t psi_E(lambda_t)
        weighted += lam * x
        weights += lam
        total += x
        mean = (0.5 + total) / (t + 1)
        var_sum += (x - mean) ** 2
        centre, half = weighted / weights, (log_term + penalty) / weights
        low, high = max(low, centre - half), min(high, centre + half)  # the running intersection
    n = len(values)
    return Interval(thumbs=n, up=int(round(sum(values))), approval=round(total / n, 4) if n else None,
                    low=round(low, 4), high=round(high, 4))


def compare(new: Sequence[float], other: Sequence[float], *, alpha: float = 0.05, margin: float = 0.05) -> dict:
    """Is `new` worse than `other`, not worse, or undecided yet? The
    evidence as a dict: each arm's interval, the difference's, the verdict."""
    if not 0 <= margin < 1:
        raise ValueError("margin is a difference of approvals, in [0, 1)")
    a, b = confidence_sequence(new, alpha / 2), confidence_sequence(other, alpha / 2)
    low, high = round(a.low - b.high, 4), round(a.high - b.low, 4)
    if high < 0:
        verdict = WORSE
    elif low > -margin:
        verdict = NOT_WORSE
    else:
        verdict = UNDECIDED
    estimate = None if a.approval is None or b.approval is None else round(a.approval - b.approval, 4)
    return {"verdict": verdict, "new": asdict(a), "other": asdict(b),
            "difference": {"estimate": estimate, "low": low, "high": high},
            "confidence": round(1 - alpha, 4), "margin": margin}
