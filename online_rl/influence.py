"""Bounded influence per rater: one rule for every dataset a run trains on.

Every row a run trains on (a thumb, a pair, a prompt of the pool, a liked
reply of the anchor) belongs to one rater, or is shared by a few (a pair
built from two people's thumbs, an opening line several people sent) and
then split into equal parts, one per owner. `rater_weights` gives every row
a positive weight such that no rater's rows (and parts) hold more than
``max(max_share, 1 / number of raters)`` of the dataset's total weight.

The rule is water-filling: raters keep their natural share (their part of
the rows) while it is within the bound; a rater above it is brought down to
the bound, and what they lose goes to the others in proportion to their
rows, which can bring another rater to the bound in turn. Inside a rater,
every row is weighted alike: the newest thumb does not count more than the
first. Weights average 1 over the dataset, so a loss that takes them keeps
its scale, and with no rater over the bound every weight is 1.

A rater over the bound keeps all their rows, each down-weighted: what they
said still counts, only not more than the bound. Where rows are drawn
rather than weighted in a loss (PPO's prompts, KTO's thumbs),
`weighted_draw` draws them in proportion to the same weights.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

TOP_RATERS = 5  # raters listed in a run's metrics
_SLACK = 1e-12  # relative tolerance when comparing a share with the bound


def owner_set(owner: str | Iterable[str]) -> tuple[str, ...]:
    """A row's owners as a tuple of distinct raters (one rater may be given as a string)."""
    owners = (owner,) if isinstance(owner, str) else tuple(dict.fromkeys(owner))
    if not owners:
        raise ValueError("every row needs a rater")
    return owners


def bound(max_share: float, raters: int) -> float:
    """The most of a dataset one rater may hold: `max_share`, or an equal
    share when there are too few raters for `max_share` to be possible."""
    return max(max_share, 1 / raters) if raters else 1.0


def rater_mass(owners: Sequence) -> dict[str, float]:
    """Each rater's part of the rows: a row counts 1, split among its owners."""
    mass: dict[str, float] = defaultdict(float)
    for owner in owners:
        parts = owner_set(owner)
        for rater in parts:
            mass[rater] += 1 / len(parts)
    return dict(mass)


def bounded_shares(mass: dict[str, float], max_share: float) -> dict[str, float]:
    """Each rater's share of the weight after the bound (they sum to 1)."""
    if not mass:
        return {}
    cap = bound(max_share, len(mass))
    capped: set[str] = set()
    while True:
        free = [r for r in mass if r not in capped]
        left = 1.0 - cap * len(capped)
        if not free or left <= 0:  # rounding, with the bound at exactly 1/n: everyone holds 1/n
            return {r: 1 / len(mass) for r in mass}
        total = sum(mass[r] for r in free)
        shares = {r: left * mass[r] / total for r in free}
        over = {r for r, s in shares.items() if s > cap * (1 + _SLACK)}
        if not over:
            return {**{r: cap for r in capped}, **shares}
        capped |= over


def weighted_parts(owners: Sequence, max_share: float) -> list[dict[str, float]]:
    """Each row's weight, split by the raters who own it (the row's weight is
    the sum), such that every weight is positive, rows average 1, and no
    rater's parts add up to more than ``max(max_share, 1 / raters)`` of the
    total. A row of one rater is one part; a row shared by k raters is k
    parts of a k-th of a row each, every rater's parts weighted alike."""
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share is a fraction of the data in (0, 1], got {max_share}")
    if not owners:
        return []
    mass = rater_mass(owners)
    shares = bounded_shares(mass, max_share)
    rows = len(owners)
    per_row = {r: rows * shares[r] / mass[r] for r in mass}  # the weight of one whole row of rater r
    parts = []
    for owner in owners:
        raters = owner_set(owner)
        parts.append({r: per_row[r] / len(raters) for r in raters})
    return parts


def rater_weights(owners: Sequence, max_share: float) -> list[float]:
    """One positive weight per row (its owners: a rater, or several sharing
    it equally), averaging 1, such that no rater holds more than
    ``max(max_share, 1 / raters)`` of the total weight (`weighted_parts`).

    ``max_share`` 1 turns the bound off: every weight is 1."""
    return [sum(part.values()) for part in weighted_parts(owners, max_share)]


def rater_shares(owners: Sequence, max_share: float, top: int = TOP_RATERS) -> dict:
    """What a run records about one dataset: the bound, how many raters and
    rows, and the `top` raters by rows with their share of the weight before
    the bound (their part of the rows) and after it."""
    mass = rater_mass(owners)
    rows: dict[str, int] = defaultdict(int)
    weighted: dict[str, float] = defaultdict(float)
    for owner, part in zip(owners, weighted_parts(owners, max_share)):
        for rater, weight in part.items():
            rows[rater] += 1
            weighted[rater] += weight
    total_mass, total_weight = sum(mass.values()), sum(weighted.values())
    ranked = sorted(mass, key=lambda r: (-mass[r], r))[:top]
    return {
        "bound": round(bound(max_share, len(mass)), 4),
        "raters": len(mass),
        "rows": len(owners),
        "top": [{"rater": r, "rows": rows[r], "share_before": round(mass[r] / total_mass, 4),
                 "share_after": round(weighted[r] / total_weight, 4)} for r in ranked],
    }


def weighted_draw(items: Sequence, weights: Sequence[float], k: int, rng) -> list:
    """`k` of `items`, each drawn in proportion to its weight: item i is drawn
    ``k * weights[i] / sum(weights)`` times in expectation, so a rater's
    share of the draws is their share of the weight.

    Systematic sampling over the items in a random order: an item is drawn at
    most once unless its weight alone is more than ``1 / k`` of the total, and
    with equal weights and ``k <= len(items)`` the draw is a uniform sample
    without repeats. `rng` is a `random.Random`."""
    if not items or k <= 0:
        return []
    order = list(range(len(items)))
    rng.shuffle(order)
    spacing = sum(weights) / k
    point = rng.random() * spacing
    picks: list = []
    reached = 0.0
    for i in order:
        reached += weights[i]
        while len(picks) < k and point < reached:
            picks.append(items[i])
            point += spacing
    while len(picks) < k:  # rounding at the very end of the total
        picks.append(items[order[-1]])
    return picks
