"""Write a benchmark's figures into docs/benchmarks.md.

Each benchmark owns one section, fenced by HTML comments, which it replaces
whole on every run; the rest of the file is left as it is.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures measured by the scripts in `benchmarks/`; each section names the command that produced it.\n"


def machine() -> str:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch_version}"
    )


def write_section(name: str, title: str, command: str, body: str, doc: Path = DOC) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    section = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Command: `{command.strip()}`  \nMeasured {stamp} on {machine()}.\n\n{body.strip()}\n"
        f"<!-- {name}:end -->"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote section {name!r} of {doc}", file=sys.stderr)


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(out)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values`, interpolated between neighbours (nan without any)."""
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)
