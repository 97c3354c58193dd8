"""What a user watches besides the metrics: where every rank is, who holds the job up, where the time goes.

Heartbeat   every rank says where it is (step, phase, progress) in <output_dir>/heartbeat/rank<N>.json,
            written each second by a background thread (the training thread only sets attributes). A
            rank that made no progress for `hang_report_s` reads everyone's heartbeat: the lowest such
            rank prints one report naming the ranks that are silent or elsewhere, with its own Python
            stack, and every live rank writes its stacks to <output_dir>/hang/rank<N>.txt. Files, not
            the process group's store: the store lives in one process, which may be the one that hangs.
StepClock   per optimizer step on this rank: time waiting for data, and the rest (compute).
Profiler    a torch.profiler trace of the configured steps, one file per rank.
flops_per_sample   model FLOPs per training sample, counted once at the start (FlopCounterMode).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from dtrain.dist import DistEnv

SILENT_AFTER_S = 5.0  # a heartbeat this old: the rank's process is stopped, dead or swapped out


class Heartbeat:
    def __init__(self, output_dir: str, env: DistEnv, report_after_s: float, interval_s: float = 1.0):
        self.env, self.report_after_s, self.interval_s = env, report_after_s, interval_s
        self.beats, self.hang = Path(output_dir) / "heartbeat", Path(output_dir) / "hang"
        self.step, self.phase, self.since, self.progress = 0, "set-up", time.time(), 0
        self.progress_at, self.progress_seen = time.time(), 0
        self.reported = False  # at most one report per stall
        self.dumped = 0.0  # the newest stack request this rank has answered
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dtrain-heartbeat", daemon=True)

    # -- the training thread: attribute writes only ---------------------------------------------

    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase, self.since = phase, time.time()
        self.progress += 1

    def tick(self) -> None:
        """Progress inside a phase (a batch evaluated, a micro-step taken)."""
        self.progress += 1

    def start(self) -> "Heartbeat":
        self.beats.mkdir(parents=True, exist_ok=True)
        self._publish()
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; the last heartbeat says the process left training ('done' or how it ended)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.enter("done")
        with contextlib.suppress(OSError):
            self._publish()

    # -- the background thread ------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread(self.thread.name)
        while not self.stopping.wait(self.interval_s):
            try:
                self._publish()
                self._answer_stack_request()
                self._check()
            except OSError:  # a full or vanished output_dir must not end training
                pass

    def _publish(self) -> None:
        now = time.time()
        if self.progress != self.progress_seen:
            self.progress_seen, self.progress_at = self.progress, now
            self.reported = False
        beat = {"rank": self.env.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                "phase": self.phase, "phase_since": self.since, "progress_at": self.progress_at, "time": now}
        path = self.beats / f"rank{self.env.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, path)

    def _check(self) -> None:
        stalled = time.time() - self.progress_at
        if self.report_after_s <= 0 or self.reported or stalled < self.report_after_s:
            return
        self.reported = True
        beats = read_heartbeats(self.beats.parent)
        now = time.time()
        stalled_live = [r for r, b in beats.items()
                        if now - b["time"] < SILENT_AFTER_S and now - b["progress_at"] >= self.report_after_s]
        if min(stalled_live, default=self.env.rank) == self.env.rank:  # one report per stall, from one rank
            self._report(beats, now, stalled)

    def _report(self, beats: dict[int, dict], now: float, stalled: float) -> None:
        self.hang.mkdir(parents=True, exist_ok=True)
        (self.hang / "request").write_text(str(now))  # every live rank writes its stacks
        lines = describe_ranks(beats, self.env.world_size, now, exclude=self.env.rank)
        print(f"hang report (rank {self.env.rank}, no progress for {stalled:.0f} s, at step {self.step} in "
              f"{self.phase}): {'; '.join(lines) or 'every rank is here too'}; stacks of the live ranks in "
              f"{self.hang}/ (this rank's below)", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._answer_stack_request()

    def _answer_stack_request(self) -> None:
        request = self.hang / "request"
        try:
            asked = float(request.read_text())
        except (OSError, ValueError):
            return
        if asked <= self.dumped:
            return
        self.dumped = asked
        with open(self.hang / f"rank{self.env.rank}.txt", "w") as f:
            f.write(f"rank {self.env.rank} (pid {os.getpid()} on {socket.gethostname()}) at step {self.step} in "
                    f"{self.phase} for {time.time() - self.since:.1f} s\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)


def name_os_thread(name: str) -> None:
    """Give the calling thread its Python name in the OS too (Linux; top -H, /proc/PID/task/*/comm, py-spy),
    so what runs beside the compute threads can be told apart from them."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME, at most 15 bytes
    except (OSError, AttributeError):
        pass


def read_heartbeats(output_dir: Path | str) -> dict[int, dict[str, Any]]:
    beats = {}
    for path in (Path(output_dir) / "heartbeat").glob("rank*.json"):
        try:
            beat = json.loads(path.read_text())
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
    return beats


def describe_ranks(beats: dict[int, dict], world_size: int, now: float, exclude: int | None = None) -> list[str]:
    """One phrase per rank that is silent, missing, or not where the others are."""
    out = []
    for rank in range(world_size):
        if rank == exclude:
            continue
        beat = beats.get(rank)
        if beat is None:
            out.append(f"rank {rank} has no heartbeat file (never started, or output_dir is not shared)")
        elif now - beat["time"] >= SILENT_AFTER_S:
            out.append(f"rank {rank} silent for {now - beat['time']:.0f} s (pid {beat['pid']} on {beat['host']}; "
                       f"last heard at step {beat['step']} in {beat['phase']})")
        else:
            out.append(f"rank {rank} at step {beat['step']} in {beat['phase']} for {now - beat['phase_since']:.0f} s")
    return out


def missing_ranks(output_dir: str, env: DistEnv) -> str:
    """For the line a rank prints when a collective times out: which ranks fell silent ('' if none or unknown)."""
    now = time.time()
    beats = read_heartbeats(output_dir)
    silent = [phrase for phrase in describe_ranks(beats, env.world_size, now, exclude=env.rank)
              if " silent for " in phrase]
    return "; ".join(silent)


# ---------------------------------------------------------------------------------------------
# Per-rank step timing


class StepClock:
    """Per optimizer step on this rank: seconds waiting for data, and the rest of the step (compute:
    forward, backward, optimizer). Host clock: on GPUs, compute is what the host spends issuing the
    step and waiting for the device where it must."""

    def __init__(self):
        self.window: list[tuple[float, float]] = []
        self.restart()

    def restart(self) -> None:
        """After work that is not a step (a mid-epoch checkpoint, evaluation): don't count it as data wait."""
        self.began = self.waiting_since = time.perf_counter()
        self.data = 0.0

    def batch_arrived(self) -> None:
        self.data += time.perf_counter() - self.waiting_since

    def micro_step_done(self) -> None:
        self.waiting_since = time.perf_counter()

    def step_done(self) -> None:
        now = time.perf_counter()
        self.window.append((self.data, now - self.began - self.data))
        self.began = self.waiting_since = now
        self.data = 0.0

    def take_window(self) -> list[float]:
        """This rank's window, as [median data s, median compute s, median step s, max step s]; starts a new one."""
        window, self.window = self.window, []
        if not window:
            return [0.0, 0.0, 0.0, 0.0]
        steps = [d + c for d, c in window]
        return [statistics.median(d for d, _ in window), statistics.median(c for _, c in window),
                statistics.median(steps), max(steps)]


class TimingWatch:
    """Turns every rank's window into metrics and, when a pattern persists, a one-line warning.

    Ranks of a data-parallel job move in lock-step: whoever arrives early waits inside the step's
    collectives, so that wait is part of its compute time and every rank's step takes as long as the
    slowest one's. What tells the ranks apart is their own time: the step less what they waited for
    others, estimated as their compute time beyond the smallest compute time of any rank. The rank
    with the most own time is the one the others wait for. (A rank that is slow in compute alone, a
    throttled GPU say, stays hidden this way: it waits less, the others wait more, and host clocks
    cannot tell waiting from working inside a collective.)
    """

    STRAGGLER = 0.2  # own time above the median rank's, as a fraction of the median step
    DATA_SHARE = 0.25  # data wait / step
    PERSIST = 3  # log windows in a row before a warning

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.straggler_windows: dict[int, int] = {}
        self.data_windows = 0

    def record(self, per_rank: list[list[float]]) -> tuple[dict[str, Any], list[str]]:
        data, compute, step, step_max = (list(column) for column in zip(*per_rank))
        own = [s - (c - min(compute)) for s, c in zip(step, compute)]
        median_step = statistics.median(step)
        slowest = max(range(len(own)), key=own.__getitem__)
        others = [r for r in range(len(own)) if r != slowest] or [slowest]
        behind = ((own[slowest] - statistics.median(own[r] for r in others)) / median_step
                  if median_step > 0 else 0.0)
        ms = lambda values: [round(1000 * v, 1) for v in values]  # noqa: E731
        fields = {"data_ms": ms(data), "compute_ms": ms(compute), "step_ms": ms(step), "step_ms_max": ms(step_max),
                  "slowest_rank": slowest, "slowest_behind": round(behind, 3)}
        return fields, self._warnings(data, step, slowest, others, behind)

    def _warnings(self, data: list[float], step: list[float], slowest: int, others: list[int],
                  behind: float) -> list[str]:
        warnings = []
        if len(step) > 1 and behind >= self.STRAGGLER:
            count = self.straggler_windows.get(slowest, 0) + 1
            self.straggler_windows = {slowest: count}
            if count == self.PERSIST:
                their_data = statistics.median(data[r] for r in others)
                cause = ("waiting for data" if data[slowest] - their_data >= 0.5 * behind * statistics.median(step)
                         else "in its own work")
                warnings.append(f"warning: rank {slowest} is a straggler: the other ranks wait for it, "
                                f"{100 * behind:.0f}% of a step, for {count} log windows; it spends the time "
                                f"{cause} (data wait {1000 * data[slowest]:.0f} ms per step, the others' "
                                f"{1000 * their_data:.0f} ms)")
        else:
            self.straggler_windows = {}
        shares = [d / s if s > 0 else 0.0 for d, s in zip(data, step)]
        worst = max(range(len(shares)), key=shares.__getitem__)
        self.data_windows = self.data_windows + 1 if shares[worst] >= self.DATA_SHARE else 0
        if self.data_windows == self.PERSIST:
            warnings.append(f"warning: waiting for data takes {100 * shares[worst]:.0f}% of a step on rank {worst}: "
                            f"more DataLoader workers (num_workers={self.num_workers} now) or faster storage "
                            "would help")
        return warnings


# ---------------------------------------------------------------------------------------------
# Profiler and FLOPs


class Profiler:
    """A torch.profiler trace of steps start_step .. start_step + steps - 1, written by every rank to
    <output_dir>/profile/ (Perfetto and TensorBoard's profiler plugin read it); on GPUs with
    cuda_memory, a CUDA memory snapshot beside it (https://pytorch.org/memory_viz reads it)."""

    def __init__(self, output_dir: str, rank: int, start_step: int, steps: int, cuda_memory: bool):
        self.folder, self.rank = Path(output_dir) / "profile", rank
        self.start_step, self.steps, self.cuda_memory = start_step, steps, cuda_memory and torch.cuda.is_available()
        self.active = None
        self.label = None  # "dtrain step N" around each profiled step: the run's own step numbers in the trace

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run (1-based)."""
        if self.active is not None:
            self.label = torch.profiler.record_function(f"dtrain step {step}")
            self.label.__enter__()
        if self.start_step <= 0 or step != self.start_step:
            return
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.folder.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.is_available()
        if not gpu:  # a CUDA build of torch on a machine without GPUs: its tracer's CUDA probe is not an error
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        # A schedule marks each step (ProfilerStep#N) in the trace; no warm-up: exactly the steps asked for.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*warmup.*")
            self.active = profile(activities=activities, record_shapes=True,
                                  schedule=schedule(wait=0, warmup=0, active=self.steps, repeat=1),
                                  on_trace_ready=tensorboard_trace_handler(str(self.folder),
                                                                           worker_name=f"rank{self.rank}"))
            if self.cuda_memory:
                torch.cuda.memory._record_memory_history()
            self.active.__enter__()
        self.label = torch.profiler.record_function(f"dtrain step {step}")
        self.label.__enter__()

    def after_step(self, step: int) -> None:
        if self.active is None:
            return
        self.label.__exit__(None, None, None)
        self.label = None
        self.active.step()
        if step == self.start_step + self.steps - 1:
            self.close()

    def close(self) -> None:
        if self.active is None:
            return
        active, self.active = self.active, None
        if self.label is not None:  # the run ended inside a profiled step
            self.label.__exit__(None, None, None)
        active.__exit__(None, None, None)
        if self.cuda_memory:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"rank{self.rank}.cuda_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)


@torch.no_grad()
def flops_per_sample(model: torch.nn.Module, forward: Callable[[torch.nn.Module, Any], Any], batch: Any,
                     samples: int) -> float:
    """Training FLOPs per sample: 3 x the forward's (backward costs about twice the forward), counted with
    FlopCounterMode on one batch in eval mode, so nothing (BatchNorm statistics, RNG) is changed."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            forward(model, batch)
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops() / max(samples, 1)
