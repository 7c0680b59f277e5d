"""docs/learning.png, drawn from the taste suite's table in docs/benchmarks.md.

The table holds every measured run of the suite, each at the commit it names
(rows measured one taste at a time are added to it beside the rows a whole
run of `bench_learning.py` writes); the figure is drawn from those rows, so
that it always shows what the table says: one row of panels per taste
(approval on the true taste, KL to the base per token, the base model's NLL
per token of the served replies, the share of known words, each per round),
one line per run.

    python benchmarks/learning_figure.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import DOC  # noqa: E402

FIGURE = ROOT / "docs" / "learning.png"
SERIES = {  # column of the table -> (panel title, y range or None)
    "approval per round (largest SE)": ("approval on held-out prompts (true taste)", (0, 1)),
    "KL/token of the served version": ("KL to the base (nats per token)", None),
    "base NLL/token": ("base NLL per token of served replies", None),
    "known words": ("share of known words", (0.8, 1)),
}


def _numbers(cell: str) -> list[float | None]:
    """'0.64 → 0.68 → – (± 0.03)' -> [0.64, 0.68, None]."""
    cell = re.sub(r"\(.*?\)", "", cell).replace("*", "")
    return [None if x.strip() in ("–", "") else float(x) for x in cell.split("→")]


def table_rows(doc: Path = DOC) -> list[dict]:
    """The runs in the learning section's table: taste, seed, noise, commit
    and each per-round series of `SERIES`."""
    text = doc.read_text()
    section = re.search(r"<!-- learning:start -->(.*?)<!-- learning:end -->", text, re.S)
    if section is None:
        raise SystemExit(f"{doc} has no learning section: run benchmarks/bench_learning.py first")
    lines = [line for line in section.group(1).splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    runs = []
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|"))))
        if cells.get("taste") in (None, "taste") or not cells.get("approval per round (largest SE)"):
            continue
        if not re.match(r"^\d", cells["approval per round (largest SE)"]):
            continue  # another table of the section
        runs.append({"taste": cells["taste"], "seed": cells["seed"], "noise": cells["noise"],
                     "commit": cells.get("commit", ""),
                     **{column: _numbers(cells[column]) for column in SERIES if column in cells}})
    if not runs:
        raise SystemExit(f"no runs in the learning table of {doc}")
    return runs


def draw(runs: list[dict], path: Path = FIGURE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tastes = list(dict.fromkeys(r["taste"] for r in runs))
    fig, axes = plt.subplots(len(tastes), len(SERIES), figsize=(4.2 * len(SERIES), 2.3 * len(tastes)),
                             squeeze=False, sharex=True)
    for row, taste in zip(axes, tastes):
        for r in (r for r in runs if r["taste"] == taste):
            label = f"s{r['seed']}" + (f" noise {r['noise']}" if float(r["noise"]) else "") + f" {r['commit']}"
            style = "--" if float(r["noise"]) else "-"
            for ax, column in zip(row, SERIES):
                ys = r.get(column) or []
                points = [(i, y) for i, y in enumerate(ys) if y is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
        row[0].set_ylabel(taste, fontsize=11)
        row[0].legend(fontsize=6, loc="upper left")
        for ax, (title, limits) in zip(row, SERIES.values()):
            ax.grid(alpha=0.3)
            if limits:
                ax.set_ylim(*limits)
    for ax, (title, _) in zip(axes[0], SERIES.values()):
        ax.set_title(title, fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("round")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    print(f"wrote {path} ({len(runs)} runs, {len(tastes)} tastes)", file=sys.stderr)


def main() -> int:
    draw(table_rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
