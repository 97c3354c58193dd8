"""``nproc=N``: N local DDP workers from a plain ``python train.py`` (or ``dtrain.train``), as torchrun starts them.

torchrun is PyTorch's elastic agent behind a command line. This module drives the same agent
(``torch.distributed.launcher.api.elastic_launch``) with the settings of ``torchrun --standalone
--nproc_per_node=N``: a c10d rendezvous on a port the OS picks, the same environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_*...), ``python -u train.py ARGS`` in
every worker, each in a session of its own, and up to ``max_restarts`` restarts of all of them.

The workers run the script, not a function: its exit path (train.py's exit_process) is what keeps
a finished Gloo run from aborting at interpreter exit. What this module adds to the agent:

- one line and the project's exit code instead of the agent's failure report;
- the outcome after a signal: the agent forwards it once to every worker, waits for them and raises
  SignalException without their exit codes, so rank 0 leaves its exit code in a file (hand_back);
- rank 0's final metrics, handed back the same way, for ``dtrain.train``;
- workers whose launcher was killed (SIGKILL) stop and save instead of training on as orphans;
- the caller's signal handlers, environment and log settings restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dtrain.config import Config
from dtrain.errors import EXIT_DONE, EXIT_ERROR, ConfigError

OUTCOME_DIR = "DTRAIN_OUTCOME_DIR"  # in the workers' environment: where rank 0 leaves its outcome
LAUNCHER_KEYS = ("nproc", "max_restarts")  # meant for the launching process, not for the workers
# torchrun's default --signals-to-handle; the configured stop_signals are added to them.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class Outcome:
    exit_code: int  # train.py's: dtrain.errors.EXIT_DONE, EXIT_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED, ...
    metrics: dict[str, float] | None = None  # rank 0's final metrics when exit_code is EXIT_DONE
    message: str = ""  # a failure no worker could report itself (one was killed by a signal)
    worker_error: str = ""  # a worker's own error line, when its output went through this process (stream_to_caller)


def worker_args(config_path: str | None, overrides: list[str], cfg: Config) -> list[str]:
    """Each worker's command line: the same, with nproc=0 (and max_restarts=0) wherever those were set."""
    words = [w for w in overrides if w.partition("=")[0].strip() not in LAUNCHER_KEYS]
    words += [f"{key}=0" for key in LAUNCHER_KEYS if getattr(cfg, key)]
    return (["--config", config_path] if config_path else []) + words


def launch_from_command_line(cfg: Config, script: str, config_path: str | None, overrides: list[str]) -> int:
    """``python train.py ... nproc=N``: run the workers, print one line if none of them could, return the exit code."""
    outcome = launch(cfg, script, worker_args(config_path, overrides, cfg))
    if outcome.message:
        print(f"error: {outcome.message}", file=sys.stderr, flush=True)
    return outcome.exit_code


def launch(cfg: Config, script: str, args: list[str], stream_to_caller: bool = False) -> Outcome:
    """Run ``python -u SCRIPT ARGS`` in cfg.nproc local workers as torchrun --standalone would; say how it ended.

    stream_to_caller: copy the workers' output line by line to this process's sys.stdout/sys.stderr
    (a notebook's cells), prefixed with the rank; otherwise they write to the inherited stdout/stderr.
    """
    from dtrain.dist import read_launch

    if read_launch(os.environ) is not None:
        raise ConfigError(f"nproc={cfg.nproc} starts workers of its own, but this process was itself started by "
                          "torchrun or srun: drop nproc=, or run `python train.py` without a launcher")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    forwarded = sorted(set(FORWARDED_SIGNALS) | set(cfg.stop_signals))
    with tempfile.TemporaryDirectory(prefix="dtrain_nproc_") as tmp, _worker_environment(cfg.nproc, tmp), \
            _quiet_agent_logs():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=str(uuid.uuid4()), role="default",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # --standalone: a store on a port the OS picks
            max_restarts=cfg.max_restarts, monitor_interval=0.1, start_method="spawn",
            signals_to_handle=",".join(forwarded),
            # After a forwarded stop signal the workers finish the step and save; after a worker died the
            # others stop within timeout_s (a collective with a dead peer fails by then). Then SIGKILL.
            shutdown_timeout=math.ceil(cfg.timeout_s),
            logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs"),
                                        tee=Std.ALL if stream_to_caller else Std.NONE),
            log_line_prefix_template="[rank${rank}]: " if stream_to_caller else None,
        )
        try:
            with _signal_handlers_restored(forwarded):  # before the outcome is read: a third signal ends this process
                elastic_launch(config, sys.executable)("-u", script, *args)
        except ChildFailedError as error:
            outcome = _failed(error, cfg)
            outcome.worker_error = _worker_error_line(tmp)
            return outcome
        except SignalException as error:
            return _signalled(error, tmp)
        return Outcome(EXIT_DONE, metrics=_handed_back(tmp, "metrics"))


def _failed(error, cfg: Config) -> Outcome:
    """A worker exited non-zero (with no restart left) and the agent stopped the others."""
    # The first to fail. Failures are listed as the agent saw them: those it found, then those it caused by
    # stopping the rest (SIGTERM). Its timestamps are whole seconds: within one, a worker killed by another
    # signal (SIGKILL, SIGSEGV...) comes before one that exited because it lost that peer.
    def order(item):
        code = item[1].exitcode
        return item[1].timestamp, not (code < 0 and code != -signal.SIGTERM)

    rank, failure = min(error.failures.items(), key=order)  # the first of equals in the agent's order
    if failure.exitcode > 0:  # it left through train.py's exit path, which printed its error (or stop) line
        return Outcome(failure.exitcode)
    restarts = f" (no restart left of max_restarts={cfg.max_restarts})" if cfg.max_restarts else ""
    return Outcome(EXIT_ERROR, message=f"rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}"
                                       f"{restarts}; the other workers were stopped (resume=auto continues from the "
                                       "last checkpoint)")


def _signalled(error, tmp: str) -> Outcome:
    """This process got a signal; the agent forwarded it to every worker, waited for them, then raised."""
    code = _handed_back(tmp, "exit_code")
    if code is not None:  # rank 0 left through train.py's exit path and printed how (EXIT_STOPPED: every rank saved)
        return Outcome(code, metrics=_handed_back(tmp, "metrics") if code == EXIT_DONE else None)
    name = signal.Signals(error.sigval).name
    return Outcome(128 + error.sigval, message=f"{name}: the workers ended without saving a checkpoint "
                                               "(resume=auto continues from the last one)")


def hand_back(**outcome: Any) -> None:
    """In rank 0 of workers started by nproc=: leave `outcome` (exit_code=, metrics=) for the launching process.

    Anywhere else it does nothing. Rank 0 speaks for the job: it exits 3 only after every rank saved
    at the same step. Files are per restart round, so a round that ended without a word is never
    read as an earlier round's.
    """
    folder = os.environ.get(OUTCOME_DIR)
    if not folder or os.environ.get("RANK") != "0":
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for key, value in outcome.items():
        path = Path(folder, f"{key}.{restart}.json")
        try:
            path.with_suffix(".tmp").write_text(json.dumps(value))
            path.with_suffix(".tmp").replace(path)
        except Exception:  # best effort, on the way out: the launcher may be gone
            pass


def stop_if_launcher_dies(stop_signals: list[str]) -> None:
    """In a worker started by nproc=: if the launching process dies without a word (SIGKILL, the OOM
    killer), send this worker a stop signal, as the launcher would have: it saves and exits 3.

    Workers run in sessions of their own (as under torchrun), so nothing else would reach them, and
    they would train on without their launcher. Elsewhere this does nothing.
    """
    if OUTCOME_DIR not in os.environ:
        return
    launcher_pid = os.getppid()
    signum = getattr(signal, stop_signals[0]) if stop_signals else signal.SIGTERM

    def watch() -> None:
        while os.getppid() == launcher_pid:  # an orphan is adopted by init or a subreaper
            time.sleep(1.0)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="dtrain-launcher-watch", daemon=True).start()


def _handed_back(tmp: str, key: str) -> Any:
    """What rank 0 of the last round left under `key`, or None (the agent makes logs/<run>/attempt_<round>/)."""
    rounds = [int(p.name.split("_")[-1]) for p in Path(tmp, "logs").glob("*/attempt_*")]
    path = Path(tmp, f"{key}.{max(rounds, default=0)}.json")
    return json.loads(path.read_text()) if path.exists() else None


def _worker_error_line(tmp: str) -> str:
    """The first 'error...' line the workers of the last round wrote to stderr, if the agent kept their logs."""
    attempts = sorted(Path(tmp, "logs").glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[-1]))
    for log in sorted(attempts[-1].glob("*/stderr.log")) if attempts else []:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("error"):
                return line[len("error"):].lstrip(": ")  # 'error: X' -> 'X', 'error [rank 1]: X' -> '[rank 1]: X'
    return ""


@contextlib.contextmanager
def _worker_environment(nproc: int, outcome_dir: str) -> Iterator[None]:
    """What the workers inherit besides the agent's variables; the caller's environment is restored after."""
    # TORCHELASTIC_SIGNALS_TO_HANDLE is set by the agent's launch_agent
    with restored_environ("OMP_NUM_THREADS", OUTCOME_DIR, "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        os.environ[OUTCOME_DIR] = outcome_dir
        if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
            os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes share the cores
        yield


@contextlib.contextmanager
def restored_environ(*names: str) -> Iterator[None]:
    """The block may set or unset these environment variables; afterwards each is as it was."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_agent_logs() -> Iterator[None]:
    """The agent logs every step of a failure or a signal ('Sending process 123 closing signal SIGTERM',
    ...) at WARNING; the workers' lines and ours say what happened. LOGLEVEL=INFO (torch's own switch) shows them."""
    if "LOGLEVEL" in os.environ:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher")]
    saved = [(logger.propagate, logger.handlers[:]) for logger in loggers]
    for logger in loggers:
        logger.propagate = False
        logger.handlers = [logging.NullHandler()]
    try:
        yield
    finally:
        for logger, (propagate, handlers) in zip(loggers, saved):
            logger.propagate, logger.handlers = propagate, handlers


@contextlib.contextmanager
def _signal_handlers_restored(names: list[str]) -> Iterator[None]:
    """The agent installs handlers for the forwarded signals and leaves them there; the caller gets its own back."""
    if threading.current_thread() is not threading.main_thread():  # no handler can be set there, by anyone
        yield
        return
    saved = {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in names}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(signum, handler)


def streams_are_inherited() -> bool:
    """True when sys.stdout/sys.stderr are this process's own stdout/stderr, which the workers inherit."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
