"""dtrain: one training entry point for CPU, DataParallel, DDP (torchrun) and SLURM."""
