"""The rater bound: no rater holds more than max(max_share, 1/raters) of a
dataset's weight, every row keeps a positive weight, and draws follow the
weights."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from online_rl.influence import rater_shares, rater_weights, weighted_draw, weighted_parts

SHARES = st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.9, 1.0])
# Row counts per rater, from a single thumb to a flood of them.
COUNTS = st.lists(st.one_of(st.integers(1, 5), st.integers(1, 3000)), min_size=1, max_size=40)


def _rows(counts: list[int]) -> list[str]:
    return [f"r{i}" for i, n in enumerate(counts) for _ in range(n)]


def _shares(raters: list[str], weights: list[float]) -> dict[str, float]:
    held: dict[str, float] = defaultdict(float)
    for rater, weight in zip(raters, weights):
        held[rater] += weight
    total = sum(weights)
    return {r: w / total for r, w in held.items()}


@settings(max_examples=300, deadline=None)
@given(counts=COUNTS, max_share=SHARES, seed=st.integers(0, 2**16))
def test_no_rater_holds_more_than_the_bound_and_every_row_keeps_a_weight(counts, max_share, seed):
    raters = _rows(counts)
    random.Random(seed).shuffle(raters)  # the order of the rows does not matter
    weights = rater_weights(raters, max_share)
    assert len(weights) == len(raters)
    assert all(w > 0 and math.isfinite(w) for w in weights)
    assert sum(weights) == pytest.approx(len(raters))  # they average 1: a loss keeps its scale
    bound = max(max_share, 1 / len(counts))
    for rater, share in _shares(raters, weights).items():
        assert share <= bound * (1 + 1e-9), (rater, share, bound)
    # Inside a rater every row weighs the same.
    by_rater = defaultdict(set)
    for rater, weight in zip(raters, weights):
        by_rater[rater].add(round(weight, 9))
    assert all(len(ws) == 1 for ws in by_rater.values())


@settings(max_examples=200, deadline=None)
@given(counts=COUNTS, max_share=SHARES)
def test_raters_within_the_bound_are_left_alone(counts, max_share):
    """Weights change nothing unless some rater's share of the rows is over the bound."""
    raters = _rows(counts)
    weights = rater_weights(raters, max_share)
    natural = _shares(raters, [1.0] * len(raters))
    if max(natural.values()) <= max(max_share, 1 / len(counts)):
        assert weights == pytest.approx([1.0] * len(raters))
    else:
        # Down-weighted, never up: the heaviest rater's rows weigh less than 1.
        heaviest = max(natural, key=natural.get)
        assert all(w < 1 for r, w in zip(raters, weights) if r == heaviest)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=3), min_size=1, max_size=200),
       max_share=SHARES)
def test_shared_rows_split_into_parts_that_keep_the_bound(rows, max_share):
    """A pair from two people's thumbs, a prompt several people sent: each
    owner's parts stay within the bound, and the parts make up the row."""
    parts = weighted_parts(rows, max_share)
    weights = rater_weights(rows, max_share)
    raters = {r for row in rows for r in row}
    held: dict[str, float] = defaultdict(float)
    for row, part, weight in zip(rows, parts, weights):
        assert set(part) == set(row) and all(v > 0 for v in part.values())
        assert sum(part.values()) == pytest.approx(weight)
        for rater, value in part.items():
            held[rater] += value
    bound = max(max_share, 1 / len(raters))
    assert max(held.values()) / sum(weights) <= bound * (1 + 1e-9)


def test_one_loud_rater_against_twenty_quiet_ones():
    raters = ["loud"] * 1000 + [f"quiet{i}" for i in range(20) for _ in range(50)]
    weights = rater_weights(raters, 0.05)
    shares = _shares(raters, weights)
    assert shares["loud"] == pytest.approx(0.05)
    assert shares["quiet0"] == pytest.approx(0.95 / 20)
    # Every one of the loud rater's thumbs still counts, each a nineteenth of a quiet one's.
    assert weights[0] / weights[-1] == pytest.approx(1 / 19)
    summary = rater_shares(raters, 0.05, top=3)
    assert summary["bound"] == 0.05 and summary["raters"] == 21 and summary["rows"] == 2000
    assert summary["top"][0] == {"rater": "loud", "rows": 1000, "share_before": 0.5, "share_after": 0.05}
    assert len(summary["top"]) == 3 and summary["top"][1]["share_after"] == pytest.approx(0.0475)


def test_few_raters_get_an_equal_share_and_one_is_unbounded():
    weights = rater_weights(["a"] * 30 + ["b"] * 5, 0.05)
    assert _shares(["a"] * 30 + ["b"] * 5, weights) == pytest.approx({"a": 0.5, "b": 0.5})
    assert rater_weights(["a"] * 7, 0.05) == pytest.approx([1.0] * 7)
    assert rater_weights(["a"] * 30 + ["b"] * 5, 1.0) == pytest.approx([1.0] * 35)  # the bound off
    assert rater_weights([], 0.05) == []
    with pytest.raises(ValueError, match="max_share"):
        rater_weights(["a"], 0.0)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=60), k=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_a_weighted_draw_takes_each_item_its_share_of_the_draws(weights, k, seed):
    """Each item is drawn floor or ceil of k * its share of the weight: a
    rater's share of the draws is their share of the weight, to within a draw per row."""
    items = list(range(len(weights)))
    drawn = weighted_draw(items, weights, k, random.Random(seed))
    assert len(drawn) == k
    counts = Counter(drawn)
    total = sum(weights)
    for i, w in enumerate(weights):
        expected = k * w / total
        assert math.floor(expected) - 1e-9 <= counts[i] <= math.ceil(expected) + 1e-9, (i, expected, counts[i])


def test_equal_weights_draw_distinct_items_at_random():
    items = list(range(50))
    first = weighted_draw(items, [1.0] * 50, 10, random.Random(1))
    assert len(set(first)) == 10
    assert first != weighted_draw(items, [1.0] * 50, 10, random.Random(2))
    assert sorted(weighted_draw(items, [1.0] * 50, 50, random.Random(3))) == items
