"""Stop requests (preemption, scancel, Ctrl-\\ ...) that every rank honours at the same step.

A signal reaches ranks at different moments, and a rank that saved or exited alone would leave
the others waiting in a collective. So the handler only sets a flag; at each optimizer step the
ranks all-reduce it (MAX), and if any rank has it they all save one checkpoint and exit together.
A second signal ends the process at once with the signal's default action.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from dtrain.dist import DistEnv, any_rank


class StopRequest:
    def __init__(self, signal_names: list[str], env: DistEnv):
        self.env = env
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for name in signal_names:
                signum = getattr(signal, name)
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # second signal: no more saving, exit now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"received {signal.Signals(signum).name} (rank {self.env.rank}): stopping at the next step "
              "to save a checkpoint; send it again to exit at once", flush=True)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank has received a stop signal (a host-side collective)."""
        return any_rank(self.received is not None, self.env)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def requeue_slurm_job() -> str:
    """Ask Slurm to requeue this job (it restarts later and resumes from last.pt). Returns a status line."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not in a Slurm job: nothing to requeue"
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue {job_id} failed: {e}"
    if done.returncode != 0:
        return f"scontrol requeue {job_id} failed: {(done.stderr or done.stdout).strip()}"
    return f"requeued Slurm job {job_id}"
