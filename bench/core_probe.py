"""How much compute N single-thread processes get at once, with no data, no model and no communication.

    python bench/core_probe.py --seconds 4          # prints one JSON line: matmul GFLOP/s of this process

Each process multiplies 256 x 256 fp32 matrices on one thread for a fixed time. bench/scaling.py runs
one alone, then N at once: if N of them cannot each keep the lone speed, the machine's cores (shared
physical cores, a busy host, other users' jobs) bound any N-process scaling, DDP or not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    for _ in range(20):  # warm-up
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(10):
            a @ b
        count += 10
    elapsed = time.perf_counter() - start
    print(json.dumps({"gflops": 2 * args.size**3 * count / elapsed / 1e9}), flush=True)


if __name__ == "__main__":
    main()
