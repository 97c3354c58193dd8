"""Run pytorch/examples' imagenet/main.py unchanged on dtrain's synthetic images, timing its optimizer steps.

    python bench/run_examples_imagenet.py --main /tmp/examples/imagenet/main.py --out m.jsonl \
        --image-size 128 --steps 24 --log-every 3 -- --dummy -a resnet18 -b 32 -j 0 --no-accel

The peer is not part of this repository: pass the path of your copy of its main.py. Its own code runs as it is;
two things are set from outside, both through public APIs:

- `--dummy` makes it build `torchvision.datasets.FakeData` at 224 px. FakeData is replaced by a function that
  returns dtrain's SyntheticImages (the very dataset class the project's runs and bench/handwritten.py use) at
  `--image-size`, so all sides train on the same images, labels and sizes.
- A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook) writes a train record
  every `--log-every` steps, in the format of the project's metrics.jsonl (samples/s, the process's CPU seconds,
  its threads and context switches), and ends the process after `--steps` steps: the peer itself would run
  an epoch of 1.28M images.

The samples/s of a window covers everything the peer does between two of its optimizer steps: loading the batch,
forward, backward, its per-step accuracy and loss.item(), and the step.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook

from common import process_counters
from dtrain.workloads.image import SyntheticImages


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--main", type=Path, required=True, help="path to pytorch/examples' imagenet/main.py")
    p.add_argument("--out", type=Path, required=True, help="metrics JSONL to write")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="the batch given to the peer with -b (for samples/s)")
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    return p.parse_args(ours), theirs


def synthetic_in_place_of_fakedata(image_size: int):
    """A stand-in for FakeData(size, image_shape, num_classes, transform): the same count and classes,
    dtrain's synthetic images at image_size."""
    def fake_data(size=1000, image_size_=None, num_classes=10, transform=None, *args, **kwargs):
        return SyntheticImages(size, num_classes, image_size, seed=0)
    return fake_data


class StepRecorder:
    """Called after every optimizer step: a train record every log_every steps, the process ends after steps."""

    def __init__(self, out: Path, steps: int, log_every: int, batch: int):
        self.out, self.steps, self.log_every, self.batch = open(out, "w"), steps, log_every, batch
        self.step, self.window_start = 0, time.perf_counter()

    def __call__(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.step % self.log_every == 0:
            now = time.perf_counter()
            self.out.write(json.dumps({"kind": "train", "step": self.step,
                                       "samples_per_sec": self.log_every * self.batch / (now - self.window_start),
                                       "cpu_s": time.process_time(), **process_counters()}) + "\n")
            self.out.flush()
            self.window_start = time.perf_counter()
        if self.step >= self.steps:
            self.out.close()
            raise SystemExit(0)


def main(argv=None) -> None:
    args, peer_args = parse_args(argv)
    torchvision.datasets.FakeData = synthetic_in_place_of_fakedata(args.image_size)
    register_optimizer_step_post_hook(StepRecorder(args.out, args.steps, args.log_every, args.batch))
    sys.argv = [str(args.main), *peer_args]
    runpy.run_path(str(args.main), run_name="__main__")


if __name__ == "__main__":
    main()
