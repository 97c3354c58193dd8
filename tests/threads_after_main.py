"""Run train.py's main() in-process, then print which threads this process still has (one JSON line).

A collective backend's threads that outlive main() can abort the process at interpreter exit; after
main() returns only the Python main thread may remain.
"""

import json
import os
import sys
from pathlib import Path

from helpers import load_train

code = load_train(sys.argv[1:])["main"]()
names = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task"))
print(json.dumps({"exit_code": code, "threads": names}), flush=True)
