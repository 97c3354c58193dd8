"""Experiment trackers: a real MLflow server (SQLite backend, local artifact folder) that a 2-rank torchrun run
logs to and a killed run resumes into; W&B offline run folders read back with wandb's own reader; CSV files;
and the ways a tracker fails (server down at start, server killed mid-run, unknown name, package missing):
one line each, training finishes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import mlflow  # noqa: F401 - the dev set-up installs the tracker extras: these tests run, never skip
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dtrain.trackers import flatten, scalars
from helpers import (SYNTH, TRAIN, finish, free_port, kill_session, logged_steps, read_metrics, run_bounded,
                     run_torchrun, run_train, start, start_command, subprocess_env, wait_until)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------
# A real MLflow tracking server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 at a free port, SQLite backend, artifacts served from a local folder."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.proc = start_command([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                   "--artifacts-destination", str(root / "artifacts")],
                                  merge_output=True)
        wait_until(self.healthy, self.proc, timeout=120, what=f"mlflow server on port {self.port}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        kill_session(self.proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def tracker_run_id(out: Path) -> str:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"][
        "tracker_run_id"]


def mlflow_runs(client: MlflowClient, project: str) -> list:
    experiment = client.get_experiment_by_name(project)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def history(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """metric key -> every (step, value) the server holds, in order."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def first_values(out: Path) -> dict[str, dict[int, float]]:
    """metric key -> step -> value, from the first metrics.jsonl record of each kind and step (a resumed run
    appends the steps a killed attempt had logged past its checkpoint again)."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for record in read_metrics(out):
        for key, value in scalars(record).items():
            values[key].setdefault(record["step"], value)
    return values


def config_params(out: Path) -> dict[str, str]:
    return {key: str(value) for key, value in flatten(yaml.safe_load((out / "config.yaml").read_text())).items()}


def test_a_two_rank_run_logs_its_config_and_every_metric_to_an_mlflow_server(tmp_path, mlflow_server):
    out, project = tmp_path / "run", f"p{uuid.uuid4().hex[:8]}"
    proc = run_torchrun([*SYNTH, "max_steps=6", "trackers=mlflow,csv", f"mlflow_tracking_uri={mlflow_server.uri}",
                         f"tracker_project={project}", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tracker" not in proc.stdout + proc.stderr  # no warning: every tracker started and delivered

    client = MlflowClient(mlflow_server.uri)
    (run,) = mlflow_runs(client, project)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dtrain.run_id"] == tracker_run_id(out)
    assert run.data.params == config_params(out)
    expected = {key: sorted(steps.items()) for key, steps in first_values(out).items()}
    logged = history(client, run)
    assert set(logged) == set(expected)
    for key, points in logged.items():  # every step once, with metrics.jsonl's value (float32 rounding aside)
        assert [step for step, _ in points] == [step for step, _ in expected[key]], key
        assert [value for _, value in points] == pytest.approx([value for _, value in expected[key]]), key
    assert {"train/loss", "train/step_ms/max", "eval/accuracy", "memory/peak_rss_mb/max"} <= set(expected)
    assert run.data.tags["dtrain.checkpoint_step"] == "6"
    assert run.data.tags["dtrain.checkpoint_dir"] == str((out / "checkpoints").resolve())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluations")}
    assert artifacts == {"evaluations/eval_step_00000006_per_class.csv", "evaluations/step_00000006.json"}
    table = client.download_artifacts(run.info.run_id, "evaluations/eval_step_00000006_per_class.csv", str(tmp_path))
    eval_record = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    rows = list(csv.DictReader(open(table)))
    assert [float(r["recall"]) for r in rows] == pytest.approx(eval_record["per_class"]["recall"])

    # The CSV tracker of the same run holds the same numbers.
    with open(out / "csv" / "train.csv") as f:
        train_rows = list(csv.DictReader(f))
    assert {int(r["step"]): float(r["train/loss"]) for r in train_rows} == pytest.approx(
        {step: value for step, value in expected["train/loss"]})


def test_a_run_killed_mid_epoch_resumes_into_the_same_mlflow_run_without_logging_a_step_twice(tmp_path,
                                                                                                mlflow_server):
    out, project = tmp_path / "run", f"p{uuid.uuid4().hex[:8]}"
    args = [*SYNTH, "epochs=2", "checkpoint_every=3", "resume=auto", "trackers=mlflow",
            f"mlflow_tracking_uri={mlflow_server.uri}", f"tracker_project={project}", f"output_dir={out}"]
    launcher = start(args, nproc=2)
    wait_until(lambda: logged_steps(out) >= 7, launcher, what="7 logged steps")
    kill_session(launcher)  # mid-epoch (12 steps per epoch), past the checkpoint of step 6
    first_id = tracker_run_id(out)
    killed_at = logged_steps(out)
    resumed = run_torchrun(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout

    client = MlflowClient(mlflow_server.uri)
    (run,) = mlflow_runs(client, project)  # one MLflow run for both attempts
    assert tracker_run_id(out) == first_id == run.data.tags["dtrain.run_id"]
    assert run.info.status == "FINISHED"
    logged = history(client, run)
    expected = first_values(out)
    for key, points in logged.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {points}"
        for step, value in points:
            assert value == pytest.approx(expected[key][step]), (key, step)
    # what the resumed attempt trained past the killed one's last record reached the same run
    train_steps = [step for step, _ in logged["train/loss"]]
    assert max(train_steps) == 24 and set(range(killed_at + 1, 25)) <= set(train_steps)
    assert [step for step, _ in logged["eval/accuracy"]] == [12, 24]


# ---------------------------------------------------------------------------------------------
# Weights & Biases, offline


def wandb_records(path: Path):
    """The protobuf records of a run-<id>.wandb file. wandb 0.31 has no Python reader of its own; the file is
    a LevelDB log (32 KiB blocks of chunks, each with a 7-byte header: CRC, little-endian length, type) after
    a 7-byte ':W&B' file header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_folder: Path) -> list[dict]:
    """The history rows of one offline run folder: {"_step": N, "train/loss": ..., ...}."""
    import json

    (path,) = run_folder.glob("run-*.wandb")
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({"_step": record.history.step.num, **row})
    return rows


def test_wandb_offline_writes_a_run_folder_with_the_history_and_a_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, "trackers=wandb", "resume=auto", f"output_dir={out}"]
    env = {"WANDB_MODE": "offline"}
    first = run_train([*args, "max_steps=4"], **env)
    assert first.returncode == 0, first.stdout + first.stderr
    run_id = tracker_run_id(out)
    second = run_train([*args, "max_steps=7"], **env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert tracker_run_id(out) == run_id

    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # one W&B run, two attempts
    expected = first_values(out)
    for folder, steps in zip(folders, ([1, 2, 3, 4], [5, 6, 7])):
        rows = [row for row in wandb_history(folder) if "train/loss" in row]
        assert [row["_step"] for row in rows] == steps
        for row in rows:
            assert row["train/loss"] == pytest.approx(expected["train/loss"][row["_step"]])


# ---------------------------------------------------------------------------------------------
# TensorBoard (the default) and CSV across a resume


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar, as TensorBoard shows it (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))  # the folder: every attempt's file in order, purges applied
    accumulator.Reload()
    events = accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
    return {e.step: e.value for e in events}


def test_after_a_resume_from_an_earlier_step_tensorboard_overwrites_and_csv_skips(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, "trackers=tensorboard,csv", f"output_dir={out}"]
    first = run_train([*args, "max_steps=5", "checkpoint_every=3", "keep_last=3"])
    assert first.returncode == 0, first.stdout + first.stderr
    # as after a crash at step 5: back to the checkpoint of step 3, steps 4 and 5 run again
    second = run_train([*args, f"resume={out / 'checkpoints' / 'step_00000003.pt'}", "max_steps=7"])
    assert second.returncode == 0, second.stdout + second.stderr
    tag = "train/step_ms/max"  # a timing: the two attempts' values of a step differ
    attempts = [[r for r in read_metrics(out) if r["kind"] == "train" and r["step"] == step] for step in (4, 5)]
    assert all(len(records) == 2 for records in attempts)  # metrics.jsonl keeps both
    first_values_, last_values = first_values(out)[tag], {r["step"]: scalars(r)[tag] for r in read_metrics(out)
                                                           if r["kind"] == "train"}
    shown = tensorboard_scalars(out / "tb", tag)
    assert sorted(shown) == list(range(1, 8))
    assert [shown[step] for step in range(1, 8)] == pytest.approx([last_values[step] for step in range(1, 8)])
    with open(out / "csv" / "train.csv") as f:
        rows = {int(r["step"]): float(r[tag]) for r in csv.DictReader(f)}
    assert sorted(rows) == list(range(1, 8))  # every step once
    assert [rows[step] for step in range(1, 8)] == pytest.approx([first_values_[step] for step in range(1, 8)])
    # the first attempt's last memory record (step 5) is past the checkpoint, hidden with its train steps
    assert set(tensorboard_scalars(out / "tb", "memory/peak_rss_mb/max")) == {7}


# ---------------------------------------------------------------------------------------------
# A tracker that cannot start or fails later: one line, and training finishes


def tracker_lines(proc: subprocess.CompletedProcess, name: str) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if f"tracker {name}" in line
            or f"tracker {name!r}" in line]


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_goes_on(tmp_path):
    out, dead = tmp_path / "run", f"http://127.0.0.1:{free_port()}"
    # wandb made missing as an uninstalled package is (its import fails); train.py runs as `python train.py`
    hide_wandb = (f"import sys, runpy; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
                  f"runpy.run_path({TRAIN!r}, run_name='__main__')")
    cmd = [sys.executable, "-c", hide_wandb, TRAIN, *SYNTH, "max_steps=3", "trackers=csv,mlflow,wandb,mlfow",
           f"mlflow_tracking_uri={dead}", f"output_dir={out}"]
    proc = run_bounded(cmd, timeout=180, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (down,) = tracker_lines(proc, "mlflow")
    assert f"cannot reach {dead}" in down and "mlflow server" in down
    (missing,) = tracker_lines(proc, "wandb")
    assert "not installed" in missing and "pip install -e '.[wandb]'" in missing
    (unknown,) = tracker_lines(proc, "mlfow")
    assert "did you mean 'mlflow'" in unknown
    assert "Traceback" not in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3]
    assert (out / "csv" / "train.csv").read_text().count("\n") == 4  # the tracker that started has all


def test_a_stalled_then_killed_mlflow_server_never_stalls_training_and_is_one_warning(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    out, project = tmp_path / "run", f"p{uuid.uuid4().hex[:8]}"
    client = MlflowClient(server.uri)
    try:
        # long enough that the tracker has started (an MLflow import, a few requests) well before the end
        launcher = start([*SYNTH, "data.synthetic_train_size=100000", "max_steps=300", "trackers=mlflow", f"mlflow_tracking_uri={server.uri}",
                          f"tracker_project={project}", f"output_dir={out}"], MLFLOW_HTTP_REQUEST_TIMEOUT="30")

        def some_metric_arrived() -> bool:
            runs = mlflow_runs(client, project)
            return bool(runs) and "train/loss" in runs[0].data.metrics

        wait_until(some_metric_arrived, launcher, what="a metric on the MLflow server")
        os.killpg(server.proc.pid, signal.SIGSTOP)  # a server that stops answering: a call waits 30 s
        stalled_at = logged_steps(out)
        wait_until(lambda: logged_steps(out) >= stalled_at + 10, launcher, timeout=20,
                   what="10 more steps while the tracking server does not answer")
    finally:
        server.stop()
    proc = finish([launcher], timeout=240)[0]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (failed,) = tracker_lines(proc, "mlflow")
    assert failed.startswith("warning: tracker mlflow failed") and "dropped" in failed
    assert "Traceback" not in proc.stdout + proc.stderr
    assert max(r["step"] for r in read_metrics(out) if r["kind"] == "train") == 300


class NeverFinishes:
    name = "stuck"

    def __init__(self):
        self.release = __import__("threading").Event()

    def start(self, run):
        pass

    def finish(self, status):
        self.release.wait()  # a tracker whose last delivery never returns


@pytest.mark.parametrize("status, waits", [("KILLED", "STOPPED_WAIT_S"), ("FINISHED", "CLOSE_WAIT_S")])
def test_a_stuck_tracker_delays_the_end_by_its_bounded_wait_and_says_where_it_waits(monkeypatch, status, waits):
    """After Ctrl-C, a stop signal or an error the wait is the short one (a CI run once saw the Ctrl-C test wait
    out the 60 s on TensorBoard's thread); the warning names the frame the tracker is stuck in."""
    import time

    from dtrain import trackers

    monkeypatch.setattr(trackers, "STOPPED_WAIT_S", 0.5)
    monkeypatch.setattr(trackers, "CLOSE_WAIT_S", 2.0)
    monkeypatch.setitem(trackers.SINKS, "stuck", NeverFinishes)
    said = []
    run = trackers.RunInfo(run_id="r", name="r", output_dir=Path("."), params={}, resumed_step=0, continued=False)
    group = trackers.Trackers(run, ["stuck"], say=said.append)
    began = time.monotonic()
    group.close(status)
    waited = time.monotonic() - began
    expected = getattr(trackers, waits)
    assert expected <= waited < expected + 1.0
    assert len(said) == 1 and said[0].startswith(f"warning: tracker stuck still sending after {expected:.0f} s")
    assert "in threading.py" in said[0] and " wait)" in said[0]  # the frame: Event.wait in finish
    group.channels[0].sink.release.set()
