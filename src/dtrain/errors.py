"""Errors a user can fix. train.py prints them as one line (on one rank) and exits non-zero."""


class UserError(Exception):
    """Bad input: a message that says what is wrong and what to do. Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, *, all_ranks: bool = True):
        super().__init__(message)
        # True when every rank meets the same error (config, data set-up): only rank 0 prints it.
        # False when one rank met it alone (a bad file in its shard): that rank prints it, naming itself.
        self.all_ranks = all_ranks


class ConfigError(UserError):
    """Unknown config key, wrong type or bad value. Exit code 2, like argparse."""

    exit_code = 2


class StopTraining(Exception):
    """A stop signal was honoured: every rank saved at the same step. Exit code 3; resume=auto continues."""

    exit_code = 3


class TrainingFailed(UserError):
    """dtrain.train with nproc>0: a worker failed. The message is its error line when it wrote one."""

    def __init__(self, message: str, *, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code  # what `python train.py ... nproc=N` exits with in the same case
