"""`python -m train` as a user meets it: --help, and one line with exit code 2 for each mistake in
the command line or config, before any work starts."""

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compile_env

ROOT = Path(__file__).resolve().parents[1]
MODEL = "--config=configs/cogvideox_5b.py:sft,runlocal"


def _train(*args, cwd=ROOT):
    cmd = [sys.executable, "-m", "train", *map(str, args)]
    env = compile_env(devices=2) | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_the_configs_quickly():
    t0 = time.perf_counter()
    proc = _train("--help")
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    for name in ("demo", "cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1_5_5b"):
        assert f"configs/{name}.py: " in proc.stdout, proc.stdout
    assert "pretrain, sft, lora" in proc.stdout and "runlocal" in proc.stdout
    assert took < 3, took  # no jax, no model code
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tools.aot", "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert proc.returncode == 0 and "--topology NAME" in proc.stdout, proc.stderr
    assert took < 3, took  # before jax and libtpu load


def test_mistakes_are_one_line_and_exit_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (
            [MODEL, "--config.optim.lrr=1e-3", "--workdir", tmp_path / "a"],
            "error: --config.optim.lrr: no such key in the config "
            "(did you mean --config.optim.lr?)",
        ),
        (
            ["--config=configs/nope.py", "--workdir", tmp_path / "a"],
            "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'",
        ),
        (
            ["--config=configs/cogvideox_5b.py:sft,runlocl", "--workdir", tmp_path / "a"],
            "error: --config: ValueError: config argument 'runlocl' is unknown or not a flag; "
            "known: ['frames', 'mode', 'res', 'runlocal']",
        ),
        (
            [MODEL, "--config.batch_size=3", "--workdir", tmp_path / "a"],
            None,  # a config rule (configs/validate.py): checked by its words below
        ),
        ([MODEL], "error: --workdir is required (python -m train --help)"),
    ]
    (tmp_path / "file").write_text("")
    cases.append(
        (
            [MODEL, "--workdir", tmp_path / "file" / "run"],
            f"error: --workdir {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a "
            "folder",
        )
    )
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(
            (
                [MODEL, "--workdir", locked / "run"],
                f"error: --workdir {locked / 'run'}: cannot write there (no write permission on "
                f"{locked})",
            )
        )
    for args, want in cases:
        proc = _train(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1, (args, proc.stderr[-2000:])
        if want is None:
            assert lines[0].startswith("error: ") and "divisible by the data shards" in lines[0]
        else:
            assert lines[0] == want, (args, lines[0])
        assert not (tmp_path / "a").exists()  # nothing was written


@pytest.mark.slow
def test_a_step_over_the_memory_limit_is_refused_before_it_runs(tmp_path):
    # XLA's plan of the step against memory_limit_gb (else the machine's free memory), checked
    # once the first batch is there and before the step runs: one line naming both, exit 2.
    c = importlib.import_module("configs.cogvideox_5b").get_config("sft,runlocal")
    proc = _train(MODEL, "--workdir", tmp_path, "--config.memory_limit_gb=0.0001")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    remat = (
        "" if c.model.remat == "full" else f", or set model\\.remat=full \\(now {c.model.remat}\\)"
    )
    want = (
        rf"error: the training step needs [\d.]+ GB "
        rf"\(batch latents \({c.batch_size}, [\d, ]+\)\) but memory_limit_gb is 0\.0001; "
        rf"lower batch_size \({c.batch_size}\){remat} "
        rf"\(traceback: {re.escape(str(tmp_path / 'error.txt'))}\)"
    )
    assert re.fullmatch(want, line), line
    assert "Traceback" not in proc.stderr and "ValueError" in (tmp_path / "error.txt").read_text()
    log = tmp_path / "metrics.jsonl"
    assert not log.exists() or not log.read_text().strip()  # no step ran
