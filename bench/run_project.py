"""Run train.py unchanged, adding the process's CPU seconds to each metrics.jsonl record ("cpu_s").

    python bench/run_project.py key=value ...      # exactly `python train.py key=value ...`

Wall-clock samples/s is what users see, but on a machine shared with other jobs it moves with their
load. CPU seconds per window are nearly immune to that (another job takes turns on a core; it does
not make this process do more work), so bench/overhead.py also reports samples per CPU-second: a loop
that adds work shows it there even when the wall-clock figures are noisy. One extra
time.process_time() call per logged record is all this adds. Each record also gets the process's
thread count and context switches so far (process_counters): what else runs beside the compute threads.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

from common import process_counters
from dtrain import metrics

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
_record = metrics.RunLogger.record


def record_with_cpu_time(self, record, step):
    return _record(self, {**record, "cpu_s": time.process_time(), **process_counters()}, step)


metrics.RunLogger.record = record_with_cpu_time
sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(str(TRAIN), run_name="__main__")
