"""dtrain: one training entry point for CPU, DataParallel, DDP (torchrun, srun or nproc=) and SLURM.

    import dtrain
    metrics = dtrain.train("configs/image/mnist_demo.yaml", {"epochs": 2}, nproc=2)
"""

from dtrain.api import train
from dtrain.errors import ConfigError, StopTraining, TrainingFailed, UserError

__all__ = ["ConfigError", "StopTraining", "TrainingFailed", "UserError", "train"]
