"""bench/run_examples_imagenet.py: the peer script it drives gets dtrain's synthetic images in place of FakeData,
and the run ends after --steps optimizer steps with a train record every --log-every steps.

The peer itself (pytorch/examples) is not in this repository; a stand-in main.py with the two things the driver
relies on (a FakeData data set under --dummy, optimizer steps) plays its part."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import ROOT, run_bounded

STAND_IN = '''
import sys
import torch
from torchvision import datasets, transforms

data = datasets.FakeData(1000, (3, 224, 224), 7, transforms.ToTensor())
image, label = data[5]
print("data", type(data).__name__, len(data), tuple(image.shape), int(label), " ".join(sys.argv[1:]), flush=True)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(1000):  # far more steps than the driver lets it take
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
print("the peer ran to its end", flush=True)
'''


@pytest.mark.slow
def test_the_peer_trains_on_synthetic_images_and_stops_after_the_steps(tmp_path):
    peer, out = tmp_path / "main.py", tmp_path / "metrics.jsonl"
    peer.write_text(STAND_IN)
    result = run_bounded([sys.executable, str(ROOT / "bench" / "run_examples_imagenet.py"), f"--main={peer}",
                          f"--out={out}", "--image-size=16", "--steps=6", "--log-every=2", "--batch=3", "--",
                          "--dummy", "-b", "3"], timeout=120, merge_output=True)
    assert result.returncode == 0, result.stdout
    assert "data SyntheticImages 1000 (3, 16, 16) 5 --dummy -b 3" in result.stdout
    assert "ran to its end" not in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["kind"] == "train" and r["samples_per_sec"] > 0 and r["cpu_s"] > 0 for r in records)
