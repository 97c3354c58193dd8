"""`nproc=N`: local DDP workers started by plain `python train.py` or `dtrain.train()`, exactly as torchrun's."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers import (ENV_DUMP, FAST, assert_one_clear_error, assert_same_run, error_lines, finish, logged_steps,
                     read_checkpoint, records, run_bounded, run_ranks, run_torchrun, run_train, start, subprocess_env,
                     wait_until, worker_with_local_rank, write_image_folder)

# Bit-exact on the CPU: deterministic kernels, one thread, a checkpoint every 2 of the 24 steps (12 per epoch).
EXACT = [*FAST, "data.synthetic=true", "data.synthetic_train_size=48", "data.synthetic_val_size=10",
         "deterministic=true", "threads=1", "epochs=2", "checkpoint_every=2", "resume=auto", "batch_size=2"]
# Long enough to be signalled mid-epoch.
LONG = [*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", "batch_size=2", "keep_last=5",
        "resume=auto"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The EXACT run under `torchrun --standalone --nproc_per_node=2`."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    proc = run_torchrun([*EXACT, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    return out


def final_eval(output_dir: Path) -> dict:
    record = records(output_dir, "eval")[-1]
    return {k: v for k, v in record.items() if k not in ("kind", "epoch", "step")}


@pytest.mark.slow
def test_nproc_runs_what_torchrun_runs_bit_for_bit(reference, tmp_path):
    out = tmp_path / "run"
    proc = run_train([*EXACT, f"output_dir={out}", "nproc=2"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done: ") == 1 and error_lines(proc.stderr) == [], proc.stdout + proc.stderr
    assert_same_run(reference, out)  # every logged loss and the final weights, exactly
    assert final_eval(out) == final_eval(reference)
    assert read_checkpoint(out)["state"]["world_size"] == 2


@pytest.mark.slow
def test_workers_get_what_torchrun_gives_them(tmp_path):
    """Same variables (values too, but for the rendezvous's port and run id), python -u, a session of their own."""
    env = subprocess_env()
    del env["OMP_NUM_THREADS"]  # torchrun sets it to 1 for several workers: so must we
    seen = {}
    for how in ("torchrun", "nproc"):
        (tmp_path / how).mkdir()
        if how == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ENV_DUMP]
        else:
            cmd = [sys.executable, "-c", "import sys; from dtrain import launcher; from dtrain.config import "
                   "load_config; sys.exit(launcher.launch(load_config(None, ['nproc=2']), sys.argv[1], "
                   "sys.argv[2:]).exit_code)", ENV_DUMP]
        proc = run_bounded([*cmd, str(tmp_path / how)], 120, env)
        assert proc.returncode == 0, proc.stderr
        seen[how] = [json.loads((tmp_path / how / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in range(2):
        theirs, ours = seen["torchrun"][rank], seen["nproc"][rank]
        added = {k: v for k, v in theirs["env"].items() if env.get(k) != v}
        ours_added = {k: v for k, v in ours["env"].items() if env.get(k) != v and k != "DTRAIN_OUTCOME_DIR"}
        assert set(ours_added) == set(added), set(ours_added) ^ set(added)
        differ = {k for k in added if ours_added[k] != added[k]}
        # per run: the store's port, the run id, the error file; and the forwarded signals (SIGUSR1 added)
        assert differ <= {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE",
                          "TORCHELASTIC_SIGNALS_TO_HANDLE"}, {k: (added[k], ours_added[k]) for k in differ}
        assert ours["env"]["RANK"] == str(rank) and ours["env"]["WORLD_SIZE"] == "2"
        assert ours["env"]["OMP_NUM_THREADS"] == "1"
        assert ours["argv"] == ["-u", ENV_DUMP, str(tmp_path / "nproc")]  # python -u SCRIPT ARGS, as torchrun:
        assert theirs["argv"] == ["-u", ENV_DUMP, str(tmp_path / "torchrun")]
        assert ours["own_session"] and theirs["own_session"]


API_SCRIPT = """
import io, json, os, signal, sys
import dtrain
from dtrain import TrainingFailed

good, bad, here = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
environ = dict(os.environ)
out, err = io.StringIO(), io.StringIO()  # as a notebook's cell output: not the process's stdout/stderr
sys.stdout, sys.stderr = out, err
metrics = dtrain.train(None, good, nproc=2)
try:
    dtrain.train(None, bad, nproc=2)
    failure = None
except TrainingFailed as e:
    failure = [str(e), e.exit_code]
environ_restored = environ == dict(os.environ)
in_process = dtrain.train(None, here, nproc=0)  # in this process, as `python train.py` without nproc
sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
print(json.dumps({"metrics": metrics, "failure": failure, "out": out.getvalue(), "err": err.getvalue(),
                  "in_process": in_process,
                  "handlers_restored": handlers == {s: signal.getsignal(s) for s in handlers},
                  "environ_restored": environ_restored and all(
                      os.environ.get(k) == environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}))
"""


@pytest.mark.slow
def test_python_entry_point_returns_the_same_metrics_and_raises_on_failure(reference, tmp_path):
    good = {**dict(word.split("=", 1) for word in EXACT), "output_dir": str(tmp_path / "run"),
            "deterministic": True, "threads": 1}  # typed values as well as strings
    bad = [*FAST, "data.root=/nonexistent/images", f"output_dir={tmp_path / 'bad'}"]
    here = [*FAST, "data.synthetic=true", "data.synthetic_train_size=16", "data.synthetic_val_size=4",
            f"output_dir={tmp_path / 'here'}"]
    proc = run_bounded([sys.executable, "-c", API_SCRIPT, *map(json.dumps, (good, bad, here))], 360, subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["metrics"] == final_eval(reference)
    assert_same_run(reference, tmp_path / "run")
    assert "[rank0]: done: " in result["out"]  # the workers' output reached the caller's sys.stdout
    message, code = result["failure"]
    assert code == 1 and message.startswith("data.root '/nonexistent/images' has no train/ folder"), message
    assert len([line for line in result["err"].splitlines() if "error" in line and "/nonexistent" in line]) == 1
    assert result["in_process"] == final_eval(tmp_path / "here") and result["in_process"]["samples"] == 4
    assert read_checkpoint(tmp_path / "here")["state"]["world_size"] == 1
    assert result["handlers_restored"] and result["environ_restored"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "SIGUSR1 to the launcher", "Ctrl-C in a terminal"])
def test_stop_signal_reaches_each_worker_once_they_save_at_one_step_and_exit_3(tmp_path, how):
    name = how.split()[0].replace("Ctrl-C", "SIGINT")
    out = tmp_path / "run"
    args = [*LONG, f"output_dir={out}", "nproc=2"] + (["stop_signals=SIGINT,SIGTERM"] if name == "SIGINT" else [])
    launcher = start(args)
    wait_until(lambda: logged_steps(out) >= 3, launcher, what="3 logged steps")
    if how.startswith("Ctrl-C"):  # a terminal signals its whole foreground process group
        os.killpg(launcher.pid, signal.SIGINT)
    else:
        launcher.send_signal(getattr(signal, name))
    done = finish([launcher], timeout=120)[0]
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr
    for rank in (0, 1):
        assert done.stdout.count(f"received {name} (rank {rank})") == 1, done.stdout
    assert error_lines(done.stderr) == [] and "Traceback" not in done.stderr, done.stderr
    stopped = int(done.stdout.split("stopped at step ")[1].split(":")[0])
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", f"step_{stopped:08d}.pt"}
    last = read_checkpoint(out)
    assert last["state"]["step"] == stopped and len(last["rng"]) == 2
    if name == "SIGTERM":  # resume=auto continues where they stopped
        again = run_train([*args, f"max_steps={stopped + 2}"])
        assert again.returncode == 0, again.stderr
        assert f"epoch 0, step {stopped}" in again.stdout
        steps = [r["step"] for r in records(out, "train")]
        assert steps[-3:] == [stopped, stopped + 1, stopped + 2] and len(steps) == len(set(steps))


@pytest.mark.slow
def test_ctrl_c_outside_the_stop_signals_is_one_line_and_130(tmp_path):
    out = tmp_path / "run"
    launcher = start([*LONG, f"output_dir={out}", "nproc=2"])
    wait_until(lambda: logged_steps(out) >= 2, launcher, what="2 logged steps")
    os.killpg(launcher.pid, signal.SIGINT)
    done = finish([launcher], timeout=120)[0]
    assert done.returncode == 130, done.stderr
    assert done.stderr.count("interrupted: nothing saved since the last checkpoint") == 1, done.stderr
    assert error_lines(done.stderr) == [] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_a_worker_killed_ends_the_job_within_timeout_s_with_one_line(tmp_path):
    out = tmp_path / "run"
    launcher = start([*LONG, f"output_dir={out}", "nproc=2", "timeout_s=30"])
    wait_until(lambda: logged_steps(out) >= 2, launcher, what="2 logged steps")
    worker = wait_until(lambda: worker_with_local_rank(launcher, 1), launcher, what="worker 1")
    worker.kill()
    began = time.monotonic()
    done = finish([launcher], timeout=120)[0]
    assert time.monotonic() - began < 30, done.stderr
    assert done.returncode == 1, done.stderr
    assert_one_clear_error(done, f"rank 1 (pid {worker.pid}) was killed by SIGKILL", "the other workers were stopped")


@pytest.mark.slow
def test_workers_of_a_launcher_killed_with_sigkill_save_at_one_step_and_stop(tmp_path):
    """Nothing can forward a SIGKILL: each worker notices it lost its launcher and sends itself a stop signal."""
    import psutil

    out = tmp_path / "run"
    launcher = start([*LONG, f"output_dir={out}", "nproc=2"])
    wait_until(lambda: logged_steps(out) >= 2, launcher, what="2 logged steps")
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2, workers
    launcher.kill()  # the launcher alone: its workers run in sessions of their own
    gone, alive = psutil.wait_procs(workers, timeout=60)
    for worker in alive:  # orphans in sessions of their own: nothing else would end them
        worker.kill()
    stdout = finish([launcher], timeout=30)[0].stdout  # the workers held the same pipe: read to its end
    assert not alive, stdout
    # Each notices within a second; the first to do so may already have stopped them both.
    assert all(stdout.count(f"received SIGTERM (rank {rank})") <= 1 for rank in (0, 1)), stdout
    assert "received SIGTERM" in stdout and stdout.count("stopped at step ") == 1, stdout
    stopped = int(stdout.split("stopped at step ")[1].split(":")[0])
    assert read_checkpoint(out)["state"]["step"] == stopped


@pytest.mark.slow
def test_max_restarts_restarts_the_workers_and_the_run_ends_as_if_never_killed(reference, tmp_path):
    out = tmp_path / "run"
    launcher = start([*EXACT, f"output_dir={out}", "nproc=2", "max_restarts=1"])
    wait_until(lambda: logged_steps(out) >= 7, launcher, what="step 7")
    wait_until(lambda: worker_with_local_rank(launcher, 1), launcher, what="worker 1").kill()
    done = finish([launcher], timeout=240)[0]
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert_same_run(reference, out)


@pytest.mark.slow
def test_a_worker_error_is_its_own_one_line_and_the_launcher_adds_none(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "001.png").write_bytes(b"\x89PNG broken")
    proc = run_train([*FAST, f"data.root={root}", f"output_dir={tmp_path / 'out'}", "epochs=3", "batch_size=1",
                      "nproc=2"])
    assert proc.returncode == 1
    assert "[rank " in assert_one_clear_error(proc, "train/a/001.png")


@pytest.mark.slow
def test_nproc_under_torchrun_or_srun_is_one_line_and_exit_2(tmp_path):
    args = [*FAST, "data.synthetic=true", f"output_dir={tmp_path}", "nproc=2"]
    ranks = run_ranks(args, world_size=2, timeout=120)  # as torchrun starts them
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    lines = [line for r in ranks for line in error_lines(r.stderr)]
    assert len(lines) == 1 and "nproc=2" in lines[0] and "torchrun or srun" in lines[0], lines
    srun = run_train(args, SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                     SLURM_NODEID="0", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", MASTER_ADDR="127.0.0.1")
    assert srun.returncode == 2
    assert_one_clear_error(srun, "nproc=2", "torchrun or srun")


@pytest.mark.parametrize("words, message", [
    (["nproc=-1"], "config key 'nproc' must be >= 0"),
    (["nproc=two"], "config key 'nproc' must be int"),
    (["max_restarts=-2", "nproc=2"], "config key 'max_restarts' must be >= 0"),
    (["max_restarts=1"], "max_restarts restarts the workers that nproc=N starts"),
    (["nproc=2", "mode=dp"], "mode=dp is one process"),
])
@pytest.mark.slow
def test_bad_nproc_values_are_one_line_and_exit_2(words, message):
    proc = run_train(["--config", "configs/image/mnist_demo.yaml", *words])
    assert proc.returncode == 2
    assert_one_clear_error(proc, message)


def test_overrides_as_a_mapping_mean_the_same_as_words():
    from dtrain.api import override_words
    from dtrain.config import load_config

    mapping = {"optim": {"lr": 0.05, "betas": [0.8, 0.95]}, "data.synthetic": True, "epochs": 3,
               "output_dir": "runs/x", "stop_signals": ["SIGUSR1"], "model.weights": None}
    words = ["optim.lr=0.05", "optim.betas=[0.8, 0.95]", "data.synthetic=true", "epochs=3", "output_dir=runs/x",
             "stop_signals=SIGUSR1", "model.weights="]
    assert load_config(None, override_words(mapping)) == load_config(None, words)
    with pytest.raises(TypeError):
        override_words("epochs=3")
