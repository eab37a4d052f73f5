"""Multi-process training (train/distributed.py, data/pipeline.py): two real `python -m train`
processes on this machine, joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID with Gloo CPU collectives, train, checkpoint, resume and log what one process
with the same devices logs; and the start-up rules for the environment variables."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compile_env
from test_train import MACHINE_KEYS

from train import distributed

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--config=configs/cogvideox_2b.py:sft,runlocal",  # global batch 2, evals at steps 3 and 6
    "--config.ckpt.every_steps=2",
    # Warm-up then constant: a run extended from 4 to 6 steps has the schedule of a 6-step run.
    "--config.optim.schedule=constant",
    "--config.log.progress=False",
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


def _run(*launches, timeout=300) -> list[str]:
    """Start every process of `launches` at once and wait for all; a failure or the timeout
    kills every one of them. Returns their output, in order."""
    todo = [x for launch in launches for x in launch]
    procs = []
    try:
        for cmd, env, log in todo:
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
        deadline = time.time() + timeout
        while any(p.poll() is None for p in procs) or any(p.returncode for p in procs):
            bad = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            assert bad is None, f"{todo[bad][2]} failed:\n{todo[bad][2].read_text()[-3000:]}"
            assert time.time() < deadline, f"timed out:\n{todo[0][2].read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        for p in procs:  # no orphans: a lone survivor would wait on its peer for minutes
            if p.poll() is None:
                p.kill()
                p.wait()
    return [log.read_text() for _, _, log in todo]


def _rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in rows]


@pytest.mark.slow
def test_two_processes_train_resume_and_equal_one_process(tmp_path):
    # One process with 2 devices, and two processes with 1 device each (started together).
    one, two_0, _ = _run(
        _launch(tmp_path / "one", processes=1, devices=2, steps=6),
        _launch(tmp_path / "two", processes=2, devices=1, steps=4),
    )
    assert "single process: 2 devices" in one
    assert "process 0 of 2" in two_0 and "per-process batch 1 of 2" in two_0
    data = tmp_path / "two" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    two_0, _ = _run(_launch(tmp_path / "two", processes=2, devices=1, steps=6))
    assert "resumed from step 4" in two_0

    want, got = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert "eval_loss" in got[2] and "eval_loss" in got[5]
    # The same global batches, noise and timesteps on the same 2-device mesh; only the
    # all-reduces differ (Gloo between processes, in-process otherwise). Summing two addends
    # is exact in either order, so the runs agree bit for bit; the tolerance leaves room for a
    # different reduction order with more processes.
    for w, g in zip(want, got, strict=True):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=0, err_msg=key)


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
