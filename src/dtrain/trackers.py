"""Experiment trackers: TensorBoard, MLflow, Weights & Biases and CSV, each a small sink behind one interface.

Rank 0 hands every tracker what metrics.jsonl receives (`trackers=[tensorboard, mlflow, wandb, csv]`):
  - at start: the resolved config as flat parameters (`optim.lr`, ...), the run's name and folder
  - every train/eval/memory record as scalars at its optimizer step (`train/loss`, `memory/peak_rss_mb/max`)
  - each evaluation's per-class table and confusion matrix (files, or the tracker's table type)
  - the run's outputs (checkpoint paths, the exported model folder) as tags

Never in the way of training: each tracker has a bounded queue and a thread of its own, so the step only
enqueues (a full queue drops the record, said once). A tracker that cannot start, or fails later, is one
line and is dropped; the run goes on, and metrics.jsonl stays the record of truth.

Resume continues the same tracker run: its id (`TrainState.tracker_run_id`) is saved in every checkpoint.
Steps never go backwards. TensorBoard overwrites (purge_step hides what the crashed attempt logged past the
checkpoint); the others cannot take a step back, so they skip: a resumed run sends them only records of
steps past the last one metrics.jsonl already held for that kind.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import json
import logging
import os
import queue
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN = ("tensorboard", "mlflow", "wandb", "csv")
QUEUE_RECORDS = 10_000  # per tracker: hours of records at log_every=1 while a server is slow
CLOSE_WAIT_S = 60.0  # at exit, how long all trackers together may take to send what they still hold
STOPPED_WAIT_S = 10.0  # the same after Ctrl-C, a stop signal or an error: whoever stopped the run is waiting


class TrackerUnavailable(Exception):
    """A tracker cannot start: the message says why and what to do."""


@dataclass
class RunInfo:
    run_id: str  # ours, kept in the checkpoint: W&B's run id, an MLflow tag
    name: str
    output_dir: Path
    params: dict[str, Any]  # the resolved config, flat
    resumed_step: int  # 0 for a fresh run
    continued: bool  # resuming a run whose id the checkpoint held
    settings: dict[str, str] = field(default_factory=dict)  # mlflow_tracking_uri, tracker_project


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: `kind/key`; a per-rank list as its min, median and max
    (three curves at any world size)."""
    kind, out = record["kind"], {}
    for key, value in record.items():
        if key in ("kind", "epoch", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            for name, stat in (("min", min(value)), ("median", statistics.median(value)), ("max", max(value))):
                out[f"{kind}/{key}/{name}"] = float(stat)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def per_class_rows(per_class: dict[str, list]) -> list[list]:
    """[class, precision, recall, f1, support] per class."""
    return [[c, *values] for c, values in enumerate(zip(per_class["precision"], per_class["recall"],
                                                        per_class["f1"], per_class["support"]))]


PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]


# ---------------------------------------------------------------------------------------------
# The sinks. Each method runs on the tracker's own thread; any exception drops the tracker.


class Sink:
    name = ""

    def start(self, run: RunInfo) -> None: ...
    def metrics(self, kind: str, values: dict[str, float], step: int) -> None: ...
    def table(self, kind: str, step: int, per_class: dict[str, list]) -> None: ...
    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None: ...
    def outputs(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str) -> None: ...


class TensorBoardSink(Sink):
    """<output_dir>/tb; on resume, purge_step hides the events a crashed attempt wrote past the checkpoint."""

    name = "tensorboard"

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter  # import only where it is used

        self.writer = SummaryWriter(str(run.output_dir / "tb"), purge_step=run.resumed_step + 1 if run.resumed_step
                                    else None)

    def metrics(self, kind: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None:
        import torch

        # rows normalised: row i is where class i's samples went, the diagonal each class's recall
        counts = torch.tensor(matrix, dtype=torch.float32)
        self.writer.add_image(f"{kind}/confusion", counts / counts.sum(dim=1, keepdim=True).clamp(min=1), step,
                              dataformats="HW")

    def finish(self, status: str) -> None:
        self.writer.close()


class MlflowSink(Sink):
    """One MLflow run per dtrain run, found again on resume by its tag `dtrain.run_id`."""

    name = "mlflow"

    def start(self, run: RunInfo) -> None:
        require("mlflow")
        # A dead server should surface in seconds, not after MLflow's default 7 retries of 120 s each.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        uri = run.settings.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:  # a local store beside the run (MLflow's file store is frozen: SQLite in mlruns/)
            local = (run.output_dir / "mlruns").resolve()
            local.mkdir(exist_ok=True)
            uri, artifacts = f"sqlite:///{local / 'mlflow.db'}", (local / "artifacts").as_uri()
        check_reachable(uri)
        # The tracker reports a dead server once itself; urllib3 would add a line per retry.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        project = run.settings.get("tracker_project") or "dtrain"
        try:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(project, artifact_location=artifacts))
            found = self.client.search_runs([experiment_id], f"tags.`dtrain.run_id` = '{run.run_id}'",
                                            max_results=1)
        except Exception as e:  # noqa: BLE001 - a bad URI or a refusing server: one line, not a traceback
            raise TrackerUnavailable(f"{uri} did not answer ({first_line(e)}): check mlflow_tracking_uri / "
                                     "MLFLOW_TRACKING_URI") from None
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            known = set(found[0].data.params)  # MLflow refuses to change a logged parameter
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run.name,
                                                 tags={"dtrain.run_id": run.run_id}).info.run_id
            known = set()
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items() if k not in known]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("dtrain.output_dir", str(run.output_dir.resolve()))])
        self.uri = uri

    def metrics(self, kind: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def table(self, kind: str, step: int, per_class: dict[str, list]) -> None:
        lines = [",".join(PER_CLASS_COLUMNS), *(",".join(map(str, row)) for row in per_class_rows(per_class))]
        self.client.log_text(self.run_id, "\n".join(lines) + "\n", f"evaluations/{kind}_step_{step:08d}_per_class.csv")

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "evaluations")

    def outputs(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, f"dtrain.{key}", value)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandbSink(Sink):
    """A W&B run whose id is ours: resume="allow" continues it. Offline unless WANDB_MODE says otherwise
    (`wandb sync <output_dir>/wandb/offline-run-*` uploads it later)."""

    name = "wandb"

    def start(self, run: RunInfo) -> None:
        require("wandb")
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        try:
            self.run = wandb.init(project=run.settings.get("tracker_project") or "dtrain", name=run.name,
                                  id=run.run_id, resume="allow", mode=mode, dir=str(run.output_dir),
                                  config=run.params, allow_val_change=True,
                                  settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        except Exception as e:  # noqa: BLE001 - no login, no network, a bad setting: one line
            raise TrackerUnavailable(f"wandb.init failed in mode {mode} ({first_line(e)}): run `wandb login`, "
                                     "or WANDB_MODE=offline to sync later") from None
        self.run.config.update({"output_dir": str(run.output_dir.resolve())}, allow_val_change=True)

    def metrics(self, kind: str, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def table(self, kind: str, step: int, per_class: dict[str, list]) -> None:
        import wandb

        self.run.log({f"{kind}/per_class": wandb.Table(columns=PER_CLASS_COLUMNS, data=per_class_rows(per_class))},
                     step=step)

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None:
        import wandb

        rows = [[str(name), *row] for name, row in zip(classes, matrix)]  # rows: true class, columns: predicted
        self.run.log({f"{kind}/confusion": wandb.Table(columns=["true \\ predicted", *map(str, classes)], data=rows)},
                     step=step)

    def outputs(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class CsvSink(Sink):
    """<output_dir>/csv/: <kind>.csv (one row per record, one column per scalar), <kind>_per_class.csv and
    <kind>_confusion.csv (long: one row per class, per cell), outputs.csv."""

    name = "csv"

    def start(self, run: RunInfo) -> None:
        self.folder = run.output_dir / "csv"
        self.folder.mkdir(exist_ok=True)

    def metrics(self, kind: str, values: dict[str, float], step: int) -> None:
        self._append(self.folder / f"{kind}.csv", [{"step": step, **values}])

    def table(self, kind: str, step: int, per_class: dict[str, list]) -> None:
        self._append(self.folder / f"{kind}_per_class.csv",
                     [{"step": step, **dict(zip(PER_CLASS_COLUMNS, row))} for row in per_class_rows(per_class)])

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None:
        self._append(self.folder / f"{kind}_confusion.csv",
                     [{"step": step, "true": true, "predicted": predicted, "count": count}
                      for true, row in zip(classes, matrix) for predicted, count in zip(classes, row)])

    def outputs(self, tags: dict[str, str]) -> None:
        self._append(self.folder / "outputs.csv", [{"key": key, "value": value} for key, value in tags.items()])

    @staticmethod
    def _append(path: Path, rows: list[dict[str, Any]]) -> None:
        """Rows at the end; a column not seen before rewrites the file with the wider header (rare: a new
        metric, such as mfu)."""
        header = path.open(newline="").readline().strip().split(",") if path.exists() else []
        new = [key for row in rows for key in row if key not in header]
        if header and not new:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, header).writerows(rows)
            return
        columns = header + list(dict.fromkeys(new))
        old = []
        if header:
            with path.open(newline="") as f:
                old = list(csv.DictReader(f))
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows([*old, *rows])
        tmp.replace(path)


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink,
                                "csv": CsvSink}


def require(package: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise TrackerUnavailable(f"the {package} package is not installed: pip install -e '.[{package}]' "
                                 f"(or pip install {package})") from None


def check_reachable(uri: str) -> None:
    """An http(s) tracking server answers /health within seconds, or the tracker does not start."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy without /health): the calls themselves will tell
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackerUnavailable(f"cannot reach {uri} ({reason}): start it (mlflow server --host 127.0.0.1 "
                                 "--port PORT ...) or point mlflow_tracking_uri / MLFLOW_TRACKING_URI at one") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# The queue and thread in front of each sink


class Channel:
    """One sink behind a bounded queue drained by its own thread: the caller never waits for the tracker."""

    def __init__(self, sink: Sink, say, capacity: int = QUEUE_RECORDS):
        self.sink, self.say = sink, say
        self.queue: queue.Queue = queue.Queue(capacity)
        self.dead = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._drain, name=f"tracker-{sink.name}", daemon=True)
        self.thread.start()

    def send(self, method: str, *args: Any) -> None:
        if self.dead:
            return
        try:
            self.queue.put_nowait((method, args))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                self.say(f"warning: tracker {self.sink.name} is falling behind (queue of {self.queue.maxsize} full): "
                         "records are dropped until it catches up; metrics.jsonl has every one")

    def close(self, status: str) -> None:
        while True:  # the finishing call must get in even when the queue is full
            try:
                self.queue.put(("finish", (status,)), timeout=0.1)
                return
            except queue.Full:
                if self.dead or not self.thread.is_alive():
                    return

    def _drain(self) -> None:
        while True:
            method, args = self.queue.get()
            if not self.dead:
                self._call(method, args)
            if method == "finish":
                return

    def _call(self, method: str, args: tuple) -> None:
        try:
            getattr(self.sink, method)(*args)
        except TrackerUnavailable as e:
            self.dead = True
            self.say(f"warning: tracker {self.sink.name} not started: {e}; the run goes on without it")
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            self.dead = True
            if method == "start":
                self.say(f"warning: tracker {self.sink.name} not started ({first_line(e)}); "
                         "the run goes on without it")
            else:
                self.say(f"warning: tracker {self.sink.name} failed ({first_line(e)}): dropped for the rest of "
                         "the run (metrics.jsonl keeps every record)")


class Trackers:
    """Rank 0's trackers: what RunLogger writes to metrics.jsonl goes to each of them too."""

    def __init__(self, run: RunInfo, names: list[str], say, skip_through: dict[str, int] | None = None):
        self.say = say
        self.skip_through = skip_through or {}  # kind -> last step metrics.jsonl held before this resume
        self.channels = []
        for name in dict.fromkeys(names):  # once each, in order
            if name not in SINKS:
                close = difflib.get_close_matches(name, KNOWN, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                say(f"warning: unknown tracker {name!r}{hint}: trackers takes {', '.join(KNOWN)}; "
                    "the run goes on without it")
                continue
            channel = Channel(SINKS[name](), say)
            channel.send("start", run)
            self.channels.append(channel)

    def _skipped(self, kind: str, step: int) -> bool:
        return step <= self.skip_through.get(kind, -1)

    def record(self, record: dict[str, Any], step: int) -> None:
        kind = record["kind"]
        values = scalars(record)
        # TensorBoard overwrites (purge_step), so it takes every step; the others skip what they had.
        for channel in self.channels:
            if channel.sink.name == "tensorboard" or not self._skipped(kind, step):
                channel.send("metrics", kind, values, step)
                if "per_class" in record:
                    channel.send("table", kind, step, record["per_class"])

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]], path: Path) -> None:
        for channel in self.channels:
            if channel.sink.name == "tensorboard" or not self._skipped(kind, step):
                channel.send("confusion", kind, step, classes, matrix, path)

    def outputs(self, tags: dict[str, str]) -> None:
        for channel in self.channels:
            channel.send("outputs", tags)

    def close(self, status: str = "FINISHED") -> None:
        """Send each tracker its finish, then wait for them to deliver: CLOSE_WAIT_S at most for all of them
        after a finished run, STOPPED_WAIT_S after any other end."""
        for channel in self.channels:
            channel.close(status)
        wait = CLOSE_WAIT_S if status == "FINISHED" else STOPPED_WAIT_S
        deadline = time.monotonic() + wait
        for channel in self.channels:
            channel.thread.join(max(deadline - time.monotonic(), 0.0))
            if channel.thread.is_alive():
                self.say(f"warning: tracker {channel.sink.name} still sending after {wait:.0f} s at the end "
                         f"(in {where(channel.thread)}): the rest is dropped (metrics.jsonl has every record)")


def where(thread: threading.Thread) -> str:
    """The innermost frame a thread is running (file:line function): what a stuck tracker waits in."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"


# ---------------------------------------------------------------------------------------------
# Set-up from the config and the train state


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]  # W&B takes [a-z0-9] ids; 16 hex digits do not collide in practice


def last_steps(metrics_jsonl: Path) -> dict[str, int]:
    """kind -> the last step metrics.jsonl holds for it (what a continued tracker run has already seen)."""
    last: dict[str, int] = {}
    if not metrics_jsonl.exists():
        return last
    with metrics_jsonl.open() as f:
        for line in f:
            try:
                record = json.loads(line)
                last[record["kind"]] = max(last.get(record["kind"], -1), int(record["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    return last


def open_trackers(names: list[str], run: RunInfo, say) -> Trackers:
    """Start the named trackers (each in the background). A continued run skips, in trackers that cannot
    overwrite, the steps that metrics.jsonl shows were logged before."""
    skip = {}
    if run.continued and any(name != "tensorboard" for name in names):
        skip = last_steps(run.output_dir / "metrics.jsonl")
    return Trackers(run, names, say, skip)


def start_trackers(cfg, env, state) -> Trackers | None:
    """Every rank: agree on the trackers' run id (kept from the checkpoint, else a new one, into `state`),
    then rank 0 starts the configured trackers."""
    from dtrain.config import to_dict
    from dtrain.dist import broadcast_object

    continued = bool(state.tracker_run_id)
    state.tracker_run_id = broadcast_object(state.tracker_run_id or new_run_id(), env)
    if not env.is_main or not cfg.trackers:
        return None
    output_dir = Path(cfg.output_dir)
    run = RunInfo(run_id=state.tracker_run_id, name=output_dir.resolve().name, output_dir=output_dir,
                  params=flatten(to_dict(cfg)), resumed_step=state.step, continued=continued,
                  settings={"mlflow_tracking_uri": cfg.mlflow_tracking_uri, "tracker_project": cfg.tracker_project})
    return open_trackers(cfg.trackers, run, say=lambda line: print(line, flush=True))
