"""The workload registry: a workload is its sections, a check across them and a builder, added by one line.

tests/tiny_workload.py defines one outside dtrain and registers it from its own script; these tests train
it under torchrun with two ranks, and check that every workload's config mistakes exit 2 with one line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, TESTS, assert_one_clear_error, read_metrics, run_torchrun, run_train, subprocess_env
from dtrain.config import help_text, load_config
from dtrain.errors import ConfigError
from dtrain.workloads import WORKLOADS

TINY_SCRIPT = str(TESTS / "tiny_workload.py")
BERT_PRESET = ["--config", "configs/bert/minilm_rotten_tomatoes.yaml"]


@pytest.fixture
def tiny(monkeypatch):
    """The tiny workload registered in this process for one test (the registry is a plain dict)."""
    from tiny_workload import TINY

    monkeypatch.setitem(WORKLOADS, "tiny", TINY)
    return TINY


@pytest.mark.slow
def test_a_workload_registered_by_its_own_script_trains_under_torchrun_with_two_ranks(tmp_path):
    out = tmp_path / "tiny"
    proc = run_torchrun(["workload=tiny", f"output_dir={out}", "epochs=3", "batch_size=8", "num_workers=0",
                         "optim.lr=0.5", "trackers=[]", "model.features=6"], nproc=2, script=TINY_SCRIPT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("tiny done") == 2, proc.stdout  # dtrain.train returned on both ranks
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    # 64 points / (8 per rank x 2 ranks) = 4 optimizer steps an epoch: the two ranks split every epoch
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 4), (1, 8), (2, 12)], evals
    assert evals[-1]["samples"] == 16  # each validation point once, over both ranks
    assert evals[-1]["accuracy"] > 0.75, evals  # the plane is learnt: chance is 0.5
    memory = [r for r in read_metrics(out) if r["kind"] == "memory"]
    assert len(memory[-1]["peak_rss_mb"]) == 2  # one figure per rank
    assert (out / "checkpoints" / "last.pt").is_file()
    assert "workload: tiny" in (out / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("command, needles", [
    (["train.py", "--config", "configs/image/mnist_demo.yaml", "data.random_erase=2"],
     ["'data.random_erase' is a probability"]),
    (["train.py", *BERT_PRESET, "data.labels=neg,neg"], ["data.labels lists a name twice"]),
    (["train.py", *BERT_PRESET, "data.text_columns=a,b", "model.max_length=3"], ["leaves no room for text"]),
    ([TINY_SCRIPT, "workload=tiny", "data.noise=0.9"], ["'data.noise' is a fraction"]),
], ids=["image", "bert", "bert across sections", "tiny"])
def test_a_bad_key_of_each_workload_exits_2_with_one_line(command, needles, tmp_path):
    script, *args = command
    proc = run_train([*args, f"output_dir={tmp_path / 'out'}"], script=str(ROOT / script))
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc, *needles)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_registered_workload_brings_its_keys_and_checks(tiny):
    cfg = load_config(None, ["workload=tiny", "model.features=3", "data.train_size=8"])
    assert (cfg.model.features, cfg.data.train_size) == (3, 8)
    assert cfg.model.describe() == "model.features=3"
    assert "[model] for workload=tiny" in help_text() and "  data.noise " in help_text()
    with pytest.raises(ConfigError, match="unknown config key 'model.arch'; valid keys at model: features"):
        load_config(None, ["workload=tiny", "model.arch=resnet18"])
    with pytest.raises(ConfigError, match="'model.features' must be >= 1, got 0"):
        load_config(None, ["workload=tiny", "model.features=0"])
    with pytest.raises(ConfigError, match="data.train_size=2 is below model.features=4"):
        load_config(None, ["workload=tiny", "data.train_size=2"])
    with pytest.raises(ConfigError, match="config key 'workload' must be one of image, bert, tiny"):
        load_config(None, ["workload=huge"])


@pytest.mark.slow
def test_config_help_and_errors_do_not_import_torch():
    """train.py loads the config (and reports its mistakes) before torch: the registry and every built-in
    workload's sections are torch-free; the builders are imported when a run starts."""
    code = ("import sys\n"
            "from dtrain.config import help_text, load_config, markdown\n"
            "from dtrain.errors import ConfigError\n"
            "help_text(); markdown()\n"
            "load_config('configs/bert/minilm_rotten_tomatoes.yaml', [])\n"
            "try:\n    load_config(None, ['data.ra_reps=0'])\nexcept ConfigError:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
