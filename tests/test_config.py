"""Config: typed, closed, YAML presets + key=value overrides, one clear error line on bad input."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import ROOT, assert_one_clear_error, run_train
from dtrain.config import SECTIONS, Config, help_text, load_config, save_config, section_types
from dtrain.errors import ConfigError
from dtrain.workloads import WORKLOADS


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(str(ROOT / preset), [])
    assert cfg.workload in WORKLOADS


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


BERT_NEEDS = ["model.name_or_path=models/bert", "data.train_files=train.csv"]  # checked when the run reads them


def test_workload_selects_the_model_and_data_sections():
    cfg = load_config(None, ["workload=bert", *BERT_NEEDS, "model.max_length=64"])
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
    (["fsdp.param_dtype=fp8"], "config key 'fsdp.param_dtype' must be one of fp32, bf16, fp16"),
    (["activation_checkpointing=sometimes"], "config key 'activation_checkpointing' must be bool"),
    (["hang_report_s=-1"], "config key 'hang_report_s' must be >= 0"),
    (["peak_tflops=-5"], "config key 'peak_tflops' must be >= 0"),
    (["profile.start_step=-1"], "config key 'profile.start_step' must be >= 0"),
    (["profile.steps=0"], "config key 'profile.steps' must be >= 1"),
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


@pytest.mark.parametrize("preset", ["configs/image/mnist_demo.yaml", "configs/bert/minilm_rotten_tomatoes.yaml"])
def test_a_runs_saved_config_yaml_is_a_preset_that_gives_the_same_config(preset, tmp_path):
    """<output_dir>/config.yaml reruns the run: --config it, and every key (of that workload) is as it was."""
    cfg = load_config(str(ROOT / preset), ["optim.lr=0.01", "epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml"), []) == cfg


def every_key() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every config key of every workload."""
    keys = [(f.name, f) for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    for workload in WORKLOADS:
        for section, cls in section_types(workload).items():
            keys += [(f"{section}.{f.name}", f) for f in dataclasses.fields(cls)]
    return list(dict(keys).items())


def test_help_lists_every_key_with_type_and_default():
    text = help_text()
    for key, f in every_key():
        assert f"  {key} " in text, f"{key} missing from --help"
        assert f.metadata.get("help"), f"{key} has no help text"


@pytest.mark.slow
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


@pytest.mark.parametrize("content, needles", [
    (b"PK\x03\x04\x00\x00\x08\x00\xff\xfe binary", ["is not a text file"]),  # a checkpoint is a zip
    (b"epochs: 2\noptim:\n\tlr: 0.1\n", ["line 3, column 1", "never tabs"]),
    (b"epochs: [1, 2\nbatch_size: 3\n", ["line 2, column", "expected ',' or ']'"]),
], ids=["binary", "tab", "unclosed list"])
@pytest.mark.slow
def test_unreadable_config_files_are_one_line_with_the_place(tmp_path, content, needles):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    proc = run_train(["--config", str(path)])
    assert proc.returncode == 2
    assert_one_clear_error(proc, str(path), *needles)


@pytest.mark.slow
def test_a_setting_the_launch_cannot_run_exits_2_with_one_line(tmp_path):
    """Found by the run, not the loader (it needs the launch), but the fix is a key: the same exit code as
    any config mistake (docs/checkpoints.md, the table of exit codes)."""
    proc = run_train(["mode=ddp", f"output_dir={tmp_path}"])
    assert proc.returncode == 2
    assert_one_clear_error(proc, "mode=ddp needs a launcher")
