"""Per-class precision, recall and F1 with the confusion matrix: exact for any number of ranks.

One trained checkpoint is evaluated (eval_only) by 1 process, 2 and 3 DDP ranks and 2 FSDP ranks with a
padding batch, on 7 validation images (3 + 2 + 2): no world size splits them evenly. The confusion counts
are summed over the ranks, so every run must report the same matrix; precision and recall are checked
against predictions made here with torchvision's v1 transforms and plain counting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import FAST, records, run_torchrun, run_train

# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow

ARGS = [*FAST, "optim.lr=0.05"]


@pytest.fixture(scope="module")
def checkpoint(tiny_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("per_class_trained")
    proc = run_train([*ARGS, f"data.root={tiny_images}", f"output_dir={out}", "epochs=2"])
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoints" / "last.pt"


def evaluated(out: Path) -> tuple[dict, dict]:
    """(the eval record, the confusion file) of an eval_only run."""
    [record] = records(out, "eval")
    [confusion] = list((out / "confusion").glob("step_*.json"))
    return record, json.loads(confusion.read_text())


def independent_predictions(checkpoint: Path, root: Path) -> tuple[list[int], list[int]]:
    """(true class, predicted class) of every validation image, without the project's data or eval code."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.models import squeezenet1_1

    model = squeezenet1_1(num_classes=3, dropout=0.0)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    prepare = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    truth, predicted = [], []
    for label, folder in enumerate(sorted((root / "val").iterdir())):
        for path in sorted(folder.iterdir()):
            with torch.no_grad():
                logits = model(prepare(Image.open(path).convert("RGB"))[None])
            truth.append(label)
            predicted.append(int(logits.argmax()))
    return truth, predicted


def test_confusion_and_per_class_metrics_are_identical_on_1_2_3_ranks_and_match_an_independent_count(
        checkpoint, tiny_images, tmp_path):
    common = [*ARGS, f"data.root={tiny_images}", "eval_only=true", f"resume={checkpoint}"]
    runs = {"1 process": run_train([*common, f"output_dir={tmp_path / '1'}"])}
    for name, nproc, extra in (("2 ranks", 2, []), ("3 ranks", 3, []),
                               ("2 ranks fsdp", 2, ["mode=fsdp", "eval_batch_size=3"])):  # rank 1: a padding batch
        runs[name] = run_torchrun([*common, f"output_dir={tmp_path / name.replace(' ', '_')}", *extra], nproc=nproc)
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    results = {name: evaluated(tmp_path / ("1" if name == "1 process" else name.replace(" ", "_")))
               for name in runs}
    record, confusion = results["1 process"]
    for name, (other_record, other_confusion) in results.items():
        assert other_confusion["matrix"] == confusion["matrix"], name
        assert other_record["per_class"] == record["per_class"], name
        assert other_record["samples"] == 7 and other_record["accuracy"] == record["accuracy"], name
    assert confusion["classes"] == ["a", "b", "c"]

    truth, predicted = independent_predictions(checkpoint, tiny_images)
    assert len(set(predicted)) >= 2, "one class predicted for everything: a weak check of precision"
    counted = [[sum(t == i and p == j for t, p in zip(truth, predicted)) for j in range(3)] for i in range(3)]
    assert confusion["matrix"] == counted
    for c in range(3):
        hits = sum(t == c and p == c for t, p in zip(truth, predicted))
        precision = hits / max(predicted.count(c), 1)
        recall = hits / max(truth.count(c), 1)
        assert record["per_class"]["precision"][c] == pytest.approx(precision, abs=1e-4)
        assert record["per_class"]["recall"][c] == pytest.approx(recall, abs=1e-4)
    assert record["macro_recall"] == pytest.approx(sum(record["per_class"]["recall"]) / 3, abs=1e-4)
