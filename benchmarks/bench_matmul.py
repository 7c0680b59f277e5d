"""What a batch can gain on this machine: the time of one projection of the
Qwen2.5-0.5B shape (896 -> 4864, float32, torch's own threads) for 1, 8 and
32 rows. A decode step is mostly such products, so a step of 8 rows costs
about what this says 8 rows cost against one, and that bounds what
continuous batching can gain over one request at a time here (see the
"Serving" section).

    python benchmarks/bench_matmul.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import table, write_section  # noqa: E402


def main() -> None:
    import torch

    torch.manual_seed(0)
    weight = torch.randn(4864, 896)
    rows, base = [], None
    for m in (1, 8, 32):
        x = torch.randn(m, 896)
        for _ in range(50):
            torch.nn.functional.linear(x, weight)
        timings = []
        for _ in range(7):  # the median of 7 runs of 200
            start = time.perf_counter()
            for _ in range(200):
                torch.nn.functional.linear(x, weight)
            timings.append((time.perf_counter() - start) / 200)
        took = sorted(timings)[3]
        base = base or took
        rows.append([m, f"{took * 1e3:.3f}", f"{took / base:.2f}", f"{m * base / took:.2f}",
                     f"{2 * m * 4864 * 896 / took / 1e9:.1f}"])
    body = table(["rows", "ms", "time against 1 row", "most a batch can gain (rows / time)", "GFLOP/s"], rows)
    body += (f"\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32. A batch of n rows can "
             "serve at most n / (its time against 1 row) times the tokens of one request at a time.")
    print(body)
    if "--no-write" not in sys.argv:
        write_section("matmul", "What a batch can gain on this CPU (one projection of the Qwen2.5-0.5B shape)",
                      "python benchmarks/bench_matmul.py", body)


if __name__ == "__main__":
    main()
