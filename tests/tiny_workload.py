"""A workload defined outside dtrain, in one file: its two config sections, a check across them, a builder,
and one `register` line. Run as a script (under torchrun, each rank runs it), it trains that workload:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tiny_workload.py workload=tiny ...

A linear classifier on random points labelled by which side of a fixed plane they fall: a few parameters,
no files, learnt in a few steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dtrain.errors import ConfigError
from dtrain.sections import DataSection, ModelSection, opt
from dtrain.workloads import Workload, register


@dataclass
class TinyModelConfig(ModelSection):
    features: int = opt(4, "input features of the linear classifier")

    def describe(self) -> str:
        return f"model.features={self.features}"

    def check(self) -> None:
        self.at_least(1, "features")


@dataclass
class TinyDataConfig(DataSection):
    train_size: int = opt(64, "random training points")
    val_size: int = opt(16, "random validation points")
    noise: float = opt(0.0, "label noise: the fraction of points whose label is flipped")

    def check(self) -> None:
        self.at_least(1, "train_size", "val_size")
        if not 0.0 <= self.noise <= 0.5:
            raise ConfigError(f"config key 'data.noise' is a fraction (0 to 0.5), got {self.noise}")


def check(model: TinyModelConfig, data: TinyDataConfig) -> None:
    if data.train_size < model.features:
        raise ConfigError(f"data.train_size={data.train_size} is below model.features={model.features}: "
                          "give more points than features")


def build(cfg, env):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from dtrain.workloads import Task

    def points(n: int, seed: int) -> TensorDataset:
        x = torch.randn(n, cfg.model.features, generator=torch.Generator().manual_seed(seed))
        return TensorDataset(x, (x.sum(dim=1) > 0).long())

    def eval_sums(model, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return {"samples": torch.tensor(float(len(y)), dtype=torch.float64),
                "loss_sum": F.cross_entropy(logits, y, reduction="sum").double(),
                "correct": (logits.argmax(dim=1) == y).sum().double()}

    def summarize(sums: dict) -> dict:
        n = max(sums.get("samples", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n, "accuracy": sums.get("correct", 0.0) / n,
                "samples": int(sums.get("samples", 0))}

    return Task(model=torch.nn.Linear(cfg.model.features, 2), train_set=points(cfg.data.train_size, cfg.seed),
                val_set=points(cfg.data.val_size, cfg.seed + 1),
                train_loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]), eval_sums=eval_sums,
                summarize=summarize, random_samples=False,
                identity={"workload": "tiny", "features": cfg.model.features})


TINY = Workload(model=TinyModelConfig, data=TinyDataConfig, build=build, check=check)


if __name__ == "__main__":
    import dtrain

    register("tiny", TINY)
    try:
        metrics = dtrain.train(overrides=sys.argv[1:], nproc=0)
    except dtrain.UserError as error:  # ConfigError too: one line and its exit code, as train.py reports them
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    print(f"tiny done: accuracy {metrics['accuracy']:.3f}", flush=True)
