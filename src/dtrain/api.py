"""``dtrain.train()``: the run ``python train.py`` makes, from a notebook, an IDE or a script."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from dtrain.config import load_config
from dtrain.errors import EXIT_DONE, EXIT_INTERRUPTED, EXIT_STOPPED, StopTraining, TrainingFailed, UserError

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"  # the checkout's entry point, run by each worker


def train(config: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
          nproc: int | None = None) -> dict[str, float]:
    """Train as ``python train.py --config CONFIG KEY=VALUE ...`` would and return the final evaluation metrics.

    config: a YAML preset, or None for the defaults. overrides: ``["optim.lr=0.05", ...]`` or
    ``{"optim.lr": 0.05, "data": {"synthetic": True}}``. nproc: N local DDP workers, as
    ``torchrun --standalone --nproc_per_node=N`` starts them, their output copied to this
    process's stdout/stderr; 0 runs in this process; None (default) takes ``nproc`` from the config.

    Raises ConfigError (a bad config, nothing started), TrainingFailed (a worker failed: its error
    line, also printed above with the rest of its output), StopTraining (a stop signal: every rank
    saved at the same step, ``resume=auto`` continues) or KeyboardInterrupt.
    """
    words = override_words(overrides) + ([] if nproc is None else [f"nproc={nproc}"])
    config_path = None if config is None else os.fspath(config)
    cfg = load_config(config_path, words)
    if not cfg.nproc:  # one process, as `python train.py` (DataParallel with several GPUs), raising instead of exiting
        from dtrain.build import run_job

        return run_job(cfg)
    from dtrain import launcher

    if not TRAIN_SCRIPT.is_file():
        raise UserError(f"nproc= runs the checkout's train.py in each worker, and there is none at {TRAIN_SCRIPT} "
                        "(install dtrain from a source checkout: pip install -e .)")
    outcome = launcher.launch(cfg, str(TRAIN_SCRIPT), launcher.worker_args(config_path, words, cfg),
                              stream_to_caller=not launcher.streams_are_inherited())
    if outcome.exit_code == EXIT_DONE:
        return outcome.metrics
    if outcome.exit_code == EXIT_STOPPED:
        raise StopTraining("stopped by a signal: every rank saved a checkpoint at the same step "
                           "(resume='auto' continues)")
    if outcome.exit_code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    raise TrainingFailed(outcome.worker_error or outcome.message or f"the workers failed (exit code "
                         f"{outcome.exit_code}); the failing rank's output is above", exit_code=outcome.exit_code)


def override_words(overrides: Sequence[str] | Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` words from a list of them or a (nested) mapping; values in YAML's flow syntax."""
    if isinstance(overrides, str):
        raise TypeError("overrides: a list of 'key=value' strings or a dict, not one string")
    if not isinstance(overrides, Mapping):
        return list(overrides)
    words = []
    for key, value in overrides.items():
        if isinstance(value, Mapping):  # a section: {"optim": {"lr": 0.1}}
            words += override_words(value, prefix=f"{prefix}{key}.")
        else:  # JSON is YAML: true, 0.05, [0.9, 0.999]; strings are taken as they are, None as empty
            text = "" if value is None else value if isinstance(value, str) else json.dumps(value)
            words.append(f"{prefix}{key}={text}")
    return words
