"""Multi-process training (train/distributed.py, data/pipeline.py): two real `python -m train`
processes on this machine, joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID with Gloo CPU collectives, train, stop together on a SIGTERM that one of them
gets (JAX's preemption service), resume and log what one process with the same devices logs;
and the start-up rules for the environment variables."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compile_env
from test_train import MACHINE_KEYS, NO_SAMPLES, STOPPED, _wait_for_rows

from train import distributed

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--config=configs/cogvideox_2b.py:sft,runlocal",  # global batch 2, a row every step
    "--config.ckpt.every_steps=1000",  # the only checkpoint: the one of the stop
    "--config.evals.every_steps=10",
    "--config.log.progress=False",
    NO_SAMPLES,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, *, processes: int, devices: int, steps: int):
    """(command, environment, log file) of each of `processes` x `python -m train`, each with
    `devices` CPU devices."""
    # No backend optimisation (conftest.FAST): it dominates the compile time of these tiny
    # programs, and every run here compiles with the same flags; the session's cache.
    env = compile_env(devices) | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        env.pop(name, None)
    if processes > 1:
        env[distributed.COORDINATOR] = f"127.0.0.1:{_free_port()}"
        env[distributed.NUM_PROCESSES] = str(processes)
    cmd = [sys.executable, "-m", "train", *ARGS, f"--config.total_steps={steps}"]
    cmd += ["--workdir", str(workdir)]
    workdir.mkdir(parents=True, exist_ok=True)
    return [
        (cmd, env | ({distributed.PROCESS_ID: str(i)} if processes > 1 else {}), log)
        for i, log in enumerate(workdir / f"process_{i}.log" for i in range(processes))
    ]


def _rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in rows]


@pytest.mark.slow
def test_two_processes_stop_on_sigterm_at_one_step_resume_and_equal_one_process(tmp_path):
    """One process with 2 devices, and two processes with 1 device each (started together).
    SIGTERM reaches process 1 only: JAX's preemption service makes both stop after the same
    step, with one checkpoint of it (each process's data position in it). Resumed by two
    processes, or by one, they log what the one process logs uninterrupted."""
    one = _launch(tmp_path / "one", processes=1, devices=2, steps=30)
    two = _launch(tmp_path / "two", processes=2, devices=1, steps=30)
    procs = [_start(*x) for x in one + two]
    with _killed_on_exit(procs):
        _wait_for_rows(procs[1], tmp_path / "two" / "metrics.jsonl", 4)
        assert procs[2].poll() is None, "the run finished before the signal"
        procs[2].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in procs]
    logs = [log.read_text() for _, _, log in one + two]
    assert "single process: 2 devices" in logs[0]
    assert "process 0 of 2" in logs[1] and "per-process batch 1 of 2" in logs[1]
    assert codes == [0, 128 + signal.SIGTERM, 128 + signal.SIGTERM], logs[1][-3000:]
    m = STOPPED.search(logs[1])  # process 0 says where it saved, for both
    assert m, logs[1][-3000:]
    step = int(m.group(2))
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == [str(step)]
    data = tmp_path / "two" / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # Resumed by the same two processes, and (a copy) by one process with both devices: the
    # bucketed data position is the same on every process, so it moves to another count.
    shutil.copytree(tmp_path / "two", tmp_path / "moved")
    procs = [
        _start(*x) for x in two + _launch(tmp_path / "moved", processes=1, devices=2, steps=30)
    ]
    with _killed_on_exit(procs):
        assert [p.wait(timeout=180) for p in procs] == [0, 0, 0]
    assert f"resumed from step {step}" in (tmp_path / "two" / "process_0.log").read_text()
    log = (tmp_path / "moved" / "process_0.log").read_text()
    assert f"resumed from step {step}" in log
    assert f"data position of step {step}: saved by 2 process(es)" in log
    want = _rows(tmp_path / "one")
    for name in ("two", "moved"):
        got = _rows(tmp_path / name)
        assert [r["step"] for r in got] == list(range(1, 31))
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
        assert all("eval_loss" in got[s - 1] for s in (10, 20, 30))
        # The same global batches, noise and timesteps on the same 2-device mesh; only the
        # all-reduces differ (Gloo between processes, in-process otherwise). Summing two
        # addends is exact in either order, so the runs agree bit for bit; the tolerance leaves
        # room for a different reduction order with more processes.
        for w, g in zip(want, got, strict=True):
            for key in (k for k in w if k not in MACHINE_KEYS):
                np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=0, err_msg=(name, key))


AGREE_SCRIPT = """
import json, os, sys
from train import distributed
distributed.initialize()
import jax
from train import checkpoint

class Steps:  # what restore_newest asks of Orbax's CheckpointManager: the step folders
    directory = sys.argv[1]
    def all_steps(self):
        return checkpoint._steps(self.directory)
    def reload(self):
        pass

def restore(step):  # step 4 has a file only process 1 reads, and it is cut short
    if step == 4 and jax.process_index() == 1:
        raise OSError("ocdbt.process_1/d/abc: unexpected end of file")
    return {"step": step}

step, state = checkpoint.restore_newest(Steps(), restore)
print(json.dumps({"step": step, "state": state}))
"""


def test_processes_agree_on_the_step_that_restores(tmp_path):
    """A step that restores on one process and not on the other is damaged for both: they
    resume from the same older step (two real processes, Gloo's all-gather)."""
    for step in (2, 4):
        (tmp_path / "ckpt" / str(step)).mkdir(parents=True)
    env = compile_env(1) | {
        distributed.COORDINATOR: f"127.0.0.1:{_free_port()}",
        distributed.NUM_PROCESSES: "2",
    }
    cmd = [sys.executable, "-c", AGREE_SCRIPT, str(tmp_path / "ckpt")]
    procs = [
        _start(cmd, env | {distributed.PROCESS_ID: str(i)}, tmp_path / f"p{i}.log") for i in (0, 1)
    ]
    with _killed_on_exit(procs):
        codes = [p.wait(timeout=120) for p in procs]
    logs = [p.log.read_text() for p in procs]
    assert codes == [0, 0], logs
    for log in logs:
        assert json.loads(log.strip().splitlines()[-1]) == {"step": 2, "state": {"step": 2}}
    aside = tmp_path / "ckpt" / "damaged" / "4"
    why = "its restore failed: process(es) [1] could not read it (their logs say why)"
    assert f"checkpoint step 4 is damaged ({why}): moved it to {aside}" in logs[0]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "damaged"]
    want = "process 1: checkpoint step 4 cannot be restored here: ocdbt.process_1/d/abc: "
    assert want + "unexpected end of file" in logs[1]


@contextlib.contextmanager
def _killed_on_exit(procs):
    """Processes still running when the block ends (a failed assertion) are killed."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _start(cmd, env, log):
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    p.log = log
    return p


# ---- Start-up rules (no processes started) ----


def test_explicit_environment():
    env = {distributed.COORDINATOR: "10.0.0.1:1234"}
    assert distributed._explicit(env) is None  # jax may use the address with a cluster
    both = {distributed.NUM_PROCESSES: "4", distributed.PROCESS_ID: "3"}
    assert distributed._explicit(env | both) == ("10.0.0.1:1234", 4, 3)
    one = {distributed.NUM_PROCESSES: "1", distributed.PROCESS_ID: "0"}
    assert distributed._explicit(one) == (None, 1, 0)  # a single process, nothing to join
    errors = [
        ({distributed.NUM_PROCESSES: "2"}, "set both"),
        ({distributed.PROCESS_ID: "0"}, "set both"),
        (env | {distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "2"}, r"\[0, "),
        (env | {distributed.NUM_PROCESSES: "0", distributed.PROCESS_ID: "0"}, r"\[0, "),
        (env | {distributed.NUM_PROCESSES: "two", distributed.PROCESS_ID: "0"}, "integers"),
        ({distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "1"}, "host:port"),
        ({distributed.COORDINATOR: "10.0.0.1"} | both, "host:port"),
    ]
    for bad, rule in errors:
        with pytest.raises(ValueError, match=rule):
            distributed._explicit(bad)


def test_detected_clusters():
    assert distributed._detected_cluster({}) is None
    slurm = {"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "node[1-2]"}
    assert distributed._detected_cluster(slurm) == "SLURM"
    assert distributed._detected_cluster(slurm | {"SLURM_NTASKS": "1"}) is None
    assert distributed._detected_cluster({"SLURM_NTASKS": "8"}) is None  # sbatch, not srun
    assert distributed._detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
