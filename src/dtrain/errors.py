"""Errors a user can fix, and the exit codes of a run. train.py prints an error as one line (on one rank) and
exits non-zero."""

# Exit codes of train.py (and of `python train.py ... nproc=N`); nothing else spells them as numbers.
EXIT_DONE = 0
EXIT_ERROR = 1  # a UserError; also a lost peer or a crashed data worker
EXIT_CONFIG = 2  # a ConfigError, like argparse's bad arguments
EXIT_STOPPED = 3  # a stop signal honoured: every rank saved at the same step, resume=auto continues
EXIT_REQUEUE_ME = 4  # stopped and saved; the Slurm job could not requeue itself: the batch script does it
EXIT_INTERRUPTED = 130  # Ctrl-C outside stop_signals (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """Bad input: a message that says what is wrong and what to do. Exit code 1."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, all_ranks: bool = True):
        super().__init__(message)
        # True when every rank meets the same error (config, data set-up): only rank 0 prints it.
        # False when one rank met it alone (a bad file in its shard): that rank prints it, naming itself.
        self.all_ranks = all_ranks


class ConfigError(UserError):
    """Unknown config key, wrong type or bad value. Exit code 2, like argparse."""

    exit_code = EXIT_CONFIG


class StopTraining(Exception):
    """A stop signal was honoured: every rank saved at the same step. Exit code 3; resume=auto continues."""

    exit_code = EXIT_STOPPED


class TrainingFailed(UserError):
    """dtrain.train with nproc>0: a worker failed. The message is its error line when it wrote one."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code  # what `python train.py ... nproc=N` exits with in the same case
