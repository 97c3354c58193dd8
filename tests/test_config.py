"""Config: typed, closed, YAML presets + key=value overrides, one clear error line on bad input."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import ROOT, assert_one_clear_error, run_train
from dtrain.config import (Config, DDPConfig, OptimConfig, WORKLOAD_SECTIONS, config_from_dict, help_text,
                           load_config, to_dict)
from dtrain.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(str(ROOT / preset), [])
    assert cfg.workload in WORKLOAD_SECTIONS


def test_overrides_are_typed_by_the_field():
    cfg = load_config(None, ["optim.lr=0.05", "epochs=3", "data.synthetic=true", "output_dir=123",
                             "stop_signals=SIGUSR1,SIGTERM", "optim.betas=[0.8, 0.95]"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 3 and cfg.data.synthetic is True
    assert cfg.output_dir == "123"  # a string field stays a string
    assert cfg.stop_signals == ["SIGUSR1", "SIGTERM"]
    assert cfg.optim.betas == [0.8, 0.95]


def test_command_line_wins_over_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 5\noptim:\n  lr: 0.2\n")
    cfg = load_config(str(preset), ["optim.lr=0.3"])
    assert (cfg.epochs, cfg.optim.lr) == (5, 0.3)


def test_exponent_floats_without_a_dot(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 2e-5\n")  # YAML 1.1 reads this as a string
    assert load_config(str(preset), []).optim.lr == 2e-5
    assert load_config(None, ["optim.lr=1e30"]).optim.lr == 1e30


def test_workload_selects_the_model_and_data_sections():
    cfg = load_config(None, ["workload=bert", "model.max_length=64"])
    assert cfg.model.max_length == 64
    with pytest.raises(ConfigError, match="unknown config key 'model.arch'.*valid keys at model"):
        load_config(None, ["workload=bert", "model.arch=resnet18"])


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    (["nosuchkey=1"], "valid keys at top level: workload, mode"),
    (["epochs=many"], "config key 'epochs' must be int, got 'many'"),
    (["data.synthetic=maybe"], "config key 'data.synthetic' must be bool"),
    (["mode=turbo"], "config key 'mode' must be one of auto, cpu, dp, ddp"),
    (["batch_size=0"], "config key 'batch_size' must be >= 1"),
    (["optim=3"], "'optim' is a section"),
    (["epochs"], "is not key=value"),
    (["stop_signals=SIGFOO"], "'SIGFOO' is not a signal name"),
    (["eval_only=true"], "eval_only=true needs a checkpoint"),
    (["optim.fused=sometimes"], "config key 'optim.fused' must be bool, got 'sometimes'"),
    (["workload=bert", "data.group_by_length=maybe"], "config key 'data.group_by_length' must be bool"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_yaml_type_errors_are_caught(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="'optim.lr' must be float"):
        load_config(str(preset), [])
    preset.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(preset), [])


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(str(ROOT / "configs/image/mnist_demo.yaml"), ["optim.lr=0.01"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_help_lists_every_key_with_type_and_default():
    text = help_text()
    sections = [(Config, ""), (OptimConfig, "optim."), (DDPConfig, "ddp.")]
    sections += [(cls, prefix) for model_t, data_t in WORKLOAD_SECTIONS.values()
                 for cls, prefix in ((model_t, "model."), (data_t, "data."))]
    for cls, prefix in sections:
        for f in dataclasses.fields(cls):
            if f.name in ("optim", "ddp", "model", "data") and cls is Config:
                continue
            assert f"  {prefix}{f.name} " in text, f"{prefix}{f.name} missing from --help"
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help text"


def test_cli_help_and_cli_errors_exit_2_with_one_line():
    proc = run_train(["--help"])
    assert proc.returncode == 0 and "optim.lr" in proc.stdout and "data.image_size" in proc.stdout
    proc = run_train(["--config", "configs/image/mnist_demo.yaml", "optim.lrr=1"])
    assert proc.returncode == 2
    assert_one_clear_error(proc, "optim.lrr", "valid keys at optim")
    proc = run_train(["--config", "configs/bert/minilm_rotten_tomatoes.yaml", "data.group_by_length=2"])
    assert proc.returncode == 2
    assert_one_clear_error(proc, "'data.group_by_length' must be bool")
    proc = run_train(["--config", "configs/nope.yaml"])
    assert proc.returncode == 2
    assert_one_clear_error(proc, "configs/nope.yaml", "does not exist")


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    sections = [(Config, ""), (OptimConfig, "optim."), (DDPConfig, "ddp.")]
    sections += [(cls, prefix) for model_t, data_t in WORKLOAD_SECTIONS.values()
                 for cls, prefix in ((model_t, "model."), (data_t, "data."))]
    missing = [f"{prefix}{f.name}" for cls, prefix in sections for f in dataclasses.fields(cls)
               if not (cls is Config and f.name in ("optim", "ddp", "model", "data"))
               and f"`{prefix}{f.name}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"
