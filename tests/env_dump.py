"""A worker that only records what its launcher gave it: environment, command line, session. Argument: a folder."""

import json
import os
import sys
from pathlib import Path

Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps({
    "env": dict(os.environ), "argv": sys.orig_argv[1:], "own_session": os.getsid(0) == os.getpid(),
}))
