"""Stop requests (preemption, scancel, Ctrl-\\ ...) that every rank honours at the same step.

A signal reaches ranks at different moments, and a rank that saved or exited alone would leave
the others waiting in a collective. So the handler only sets a flag; at each optimizer step the
ranks all-reduce it (MAX), and if any rank has it they all save one checkpoint and exit together.
A second signal ends the process at once with the signal's default action.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dtrain.dist import DistEnv, any_rank
from dtrain.errors import EXIT_REQUEUE_ME, EXIT_STOPPED


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


# Exit code of a run that stopped and saved but could not requeue its Slurm job itself (no `scontrol`
# where it runs, e.g. inside a container, or scontrol failed): the sbatch scripts requeue it from the
# batch shell, which runs outside the container. EXIT_STOPPED stays "stopped after saving, nothing more to do".
REQUEUE_ME = EXIT_REQUEUE_ME
# Set by the torchrun-style sbatch scripts: torchrun turns a worker's exit code into 1, so rank 0 also
# leaves its request in this file for the batch shell.
REQUEUE_FILE_VAR = "DTRAIN_REQUEUE_FILE"


@dataclass
class Requeue:
    line: str  # what happened, for the log
    exit_code: int  # EXIT_STOPPED: done (requeued, or nothing to requeue); REQUEUE_ME: the batch script should requeue


def slurm_requeue_target(environ: Mapping[str, str]) -> str:
    """The id `scontrol requeue` must name: in a job array the task itself (<array job id>_<task id>),
    since the array's own id (which one task carries as its SLURM_JOB_ID) names every task."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return environ["SLURM_JOB_ID"]


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> Requeue:
    """Ask Slurm to requeue this job (it restarts later and resumes from last.pt)."""
    environ = os.environ if environ is None else environ
    if not environ.get("SLURM_JOB_ID"):
        return Requeue("not in a Slurm job: nothing to requeue", EXIT_STOPPED)
    target = slurm_requeue_target(environ)
    if environ.get("SLURM_HET_SIZE"):
        return _ask_batch_script(environ, f"heterogeneous Slurm job {target}: Slurm requeues only the whole job, "
                                          "from its batch script")
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol is None:
        return _ask_batch_script(environ, "scontrol is not on PATH here (a container?)")
    try:
        done = subprocess.run([scontrol, "requeue", target], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return _ask_batch_script(environ, f"scontrol requeue {target} failed: {e}")
    if done.returncode == 0:
        return Requeue(f"requeued Slurm job {target}", EXIT_STOPPED)
    why = (done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout).strip() else ""
    if "disabled" in why.lower():  # the job is not requeueable: the batch shell would be refused too
        return Requeue(f"Slurm job {target} was not requeued ({why}): it was submitted without --requeue (or the "
                       "cluster sets JobRequeue=0); submit it again, with --requeue, and it resumes from last.pt",
                       EXIT_STOPPED)
    return _ask_batch_script(environ, f"scontrol requeue {target} failed: {why}")


def _ask_batch_script(environ: Mapping[str, str], why: str) -> Requeue:
    flag = environ.get(REQUEUE_FILE_VAR)
    if flag:
        with contextlib.suppress(OSError):
            Path(flag).write_text(f"{REQUEUE_ME}\n")
    return Requeue(f"{why}; exiting with code {REQUEUE_ME} so that the batch script requeues the job", REQUEUE_ME)
