"""How much compute and memory bandwidth N single-thread processes get at once: no model, no communication.

    python bench/core_probe.py --seconds 3      # one JSON line: this process's matmul GFLOP/s and copy GB/s

Each process first multiplies 256 x 256 fp32 matrices (cache-resident: measures the core), then copies
a 128 MB tensor (measures memory bandwidth), on one thread, for a fixed time each. bench/scaling.py runs
one alone, then N at once: if N of them cannot each keep the lone speed, the machine (shared physical
cores, memory bandwidth, a busy host, other users' jobs) bounds any N-process scaling, DDP or not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rate(work, amount: float, seconds: float) -> float:
    """amount per second of repeating work() for `seconds` (after a short warm-up)."""
    for _ in range(3):
        work()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        count += 1
    return amount * count / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    gflops = rate(lambda: [a @ b for _ in range(10)], 10 * 2 * 256**3 / 1e9, args.seconds)
    src, dst = torch.randn(32 * 2**20), torch.empty(32 * 2**20)  # 128 MB each: far beyond the caches
    gbps = rate(lambda: dst.copy_(src), 2 * src.numel() * 4 / 1e9, args.seconds)  # read + write
    print(json.dumps({"matmul_gflops": gflops, "copy_gbps": gbps}), flush=True)


if __name__ == "__main__":
    main()
