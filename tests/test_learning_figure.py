"""docs/learning.png is drawn from the taste suite's table, row by row."""

from benchmarks.learning_figure import draw, table_rows

SECTION = """# Benchmarks

<!-- learning:start -->
## The taste suite

| taste | seed | noise | approval per round (largest SE) | gain | KL/token of the served version | base NLL/token | known words | commit |
|---|---|---|---|---|---|---|---|---|
| concise | 0 | 0 | 0.64 → 0.70 → 0.77 (± 0.03) | **+0.13** | 0.00 → 0.04 → 0.13 | 0.45 → 0.46 → 0.49 | 0.92 → 0.93 → 0.94 | abc1234 |
| long | 1 | 0.2 | 0.20 → – → 0.24 (± 0.02) | **+0.04** | 0.00 → 0.00 → 0.05 | 0.45 → 0.45 → 0.44 | 0.92 → 0.92 → 0.95 | def5678 |

| taste | starter: liked / best-of-16 |
|---|---|
| concise | 0.62 / 0.91 |
<!-- learning:end -->
"""


def test_the_figure_is_drawn_from_every_run_of_the_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(SECTION)
    runs = table_rows(doc)
    assert [(r["taste"], r["seed"], r["noise"], r["commit"]) for r in runs] == [
        ("concise", "0", "0", "abc1234"), ("long", "1", "0.2", "def5678")]
    assert runs[0]["approval per round (largest SE)"] == [0.64, 0.70, 0.77]
    assert runs[1]["approval per round (largest SE)"] == [0.20, None, 0.24]  # a round not measured
    assert runs[1]["known words"] == [0.92, 0.92, 0.95]
    figure = tmp_path / "learning.png"
    draw(runs, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_doc_without_the_suite_says_what_to_run(tmp_path):
    import pytest

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    with pytest.raises(SystemExit, match="bench_learning.py"):
        table_rows(doc)
