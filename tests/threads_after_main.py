"""Run train.py's main() in-process, then print which threads this process still has (one JSON line).

A collective backend's threads that outlive main() can abort the process at interpreter exit; after
main() returns only the Python main thread may remain.
"""

import json
import os
import runpy
import sys
from pathlib import Path

train = Path(__file__).resolve().parents[1] / "train.py"
sys.argv = [str(train), *sys.argv[1:]]
code = runpy.run_path(str(train), run_name="train")["main"]()
names = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task"))
print(json.dumps({"exit_code": code, "threads": names}), flush=True)
