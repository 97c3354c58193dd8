"""Train an image classifier or a BERT text classifier: on one device, with DataParallel, DDP or FSDP.

    python train.py --config configs/image/mnist_demo.yaml [key=value ...]       # one process
    python train.py --config configs/image/mnist_demo.yaml mode=dp               # all local GPUs, one process
    torchrun --standalone --nproc_per_node=2 train.py --config configs/image/mnist_demo.yaml   # DDP
    torchrun --standalone --nproc_per_node=2 train.py --config ... mode=fsdp     # sharded (FSDP2)
    srun python train.py --config ...                                            # DDP under SLURM
    python train.py --config configs/image/mnist_demo.yaml nproc=2               # DDP, workers started here

Only the launch command changes; dtrain.dist reads it from the environment, dtrain.strategies
holds what each mode does with the model.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import NoReturn

from dtrain.config import help_text, load_config
from dtrain.errors import EXIT_DONE, EXIT_ERROR, EXIT_INTERRUPTED, StopTraining, UserError
from dtrain.launcher import hand_back, launch_from_command_line, stop_if_launcher_dies


REPORT_GRACE_S = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train with one config on CPU, DataParallel, DDP (torchrun) or SLURM (srun).",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/image/mnist_demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = job = None
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.nproc:  # this process only starts the workers: each runs this file with nproc=0
            return launch_from_command_line(cfg, os.path.abspath(__file__), args.config, args.overrides)
        stop_if_launcher_dies(cfg.stop_signals)  # a worker started by nproc=: saves and stops if orphaned
        from dtrain.build import Job  # torch is imported only once the command line is known to be good

        job = Job(cfg)
        metrics = job.start()
        if job.env.is_main:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}  # not per-class lists
            print(f"done: {', '.join(f'{k} {v:.4g}' for k, v in numbers.items())}; outputs in {cfg.output_dir}")
            hand_back(metrics=metrics)  # to the process that started this worker with nproc=, if one did
        return EXIT_DONE
    except BaseException as error:
        if threading.current_thread() is threading.main_thread():
            # A DataLoader whose worker died raises from its SIGCHLD handler again at every later child
            # exit, which would interrupt the report below.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return exit_code_for(error, cfg, None if job is None else job.env)
    finally:
        if job is not None:
            job.close()


def exit_code_for(error: BaseException, cfg, env) -> int:
    """Report how the run ended, in one line where it is not a bug; re-raise bugs (their traceback is the report)."""
    from dtrain.data import worker_failure

    if isinstance(error, UserError):
        report(error, env)
        return error.exit_code
    if isinstance(error, StopTraining):  # a stop signal: the checkpoint is saved, resume=auto continues
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C outside stop_signals: no save, no traceback from every rank
        if env is None or env.is_main:
            print("interrupted: nothing saved since the last checkpoint (resume=auto continues from it)",
                  file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if isinstance(error, Exception) and (why := worker_failure(error)) is not None:
        report(UserError(why, all_ranks=False), env)
        return EXIT_ERROR
    if isinstance(error, Exception) and env is not None and env.distributed:
        from dtrain import dist

        if dist.is_peer_failure(error):
            from dtrain.observe import missing_ranks

            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            silent = missing_ranks(cfg.output_dir, env)
            if silent:  # nobody else will say it: the job's one line names who went missing
                print(f"error [rank {env.rank}]: {silent}; a collective gave up after timeout_s={cfg.timeout_s:g} "
                      f"({first_line})", file=sys.stderr, flush=True)
            else:  # another rank failed first and says why; this one only notes that it lost its peers
                print(f"rank {env.rank}: stopping, lost contact with another rank ({first_line})", file=sys.stderr)
            return EXIT_ERROR
    raise error


def report(error: UserError, env) -> None:
    """One line per job: rank 0 reports errors every rank shares; a rank alone in its error names itself."""
    rank = env.rank if env is not None else launcher_int("RANK", "SLURM_PROCID", 0)
    world_size = env.world_size if env is not None else launcher_int("WORLD_SIZE", "SLURM_NTASKS", 1)
    if error.all_ranks and rank != 0:
        # Stay a moment: torchrun and srun --kill-on-bad-exit end the other ranks as soon as one exits
        # non-zero, and rank 0 might be ended before it printed the line this rank leaves to it.
        time.sleep(REPORT_GRACE_S)
        return
    where = "" if error.all_ranks or world_size == 1 else f" [rank {rank}]"
    print(f"error{where}: {error}", file=sys.stderr, flush=True)


def launcher_int(name: str, slurm_name: str, default: int) -> int:
    """A launcher variable before the launch was understood (it may be the very thing that is wrong)."""
    try:
        return int(os.environ.get(name, os.environ.get(slurm_name, default)))
    except ValueError:
        return default


def exit_process(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's finalization.

    Collective backends run C++ worker threads. When a Gloo worker frees the last reference to a
    finished collective's tensors, it takes the GIL; if the main thread is finalizing the
    interpreter at that moment, CPython ends that thread with pthread_exit, whose unwinding reaches
    a C++ destructor, and std::terminate aborts the whole process ("terminate called without an
    active exception", SIGABRT) after its work is done: launchers and Slurm then record a failure.
    Everything this process writes is closed and flushed by now, so finalization has nothing left
    to do that matters.
    """
    # A DataLoader's SIGCHLD handler raises in this thread when one of its workers dies, also while we exit.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    hand_back(exit_code=code)  # to the process that started this worker with nproc=, if one did
    gc.collect()  # DataLoader iterators shut their worker processes down when collected
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = EXIT_ERROR
    try:
        exit_code = main()
    except SystemExit as e:  # argparse: --help (0), bad arguments (2)
        exit_code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # a bug: its traceback is the useful report
        traceback.print_exc()
    finally:  # also when printing the report raised again
        exit_process(exit_code)
