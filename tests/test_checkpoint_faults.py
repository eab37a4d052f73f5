"""Faults a long run meets (train/checkpoint.py, train/workdir_lock.py): a damaged newest
checkpoint (a truncated tensor file, a lost or broken metadata file) is reported, moved aside and
the run resumes from the newest intact step as an uninterrupted run would; a pinned ckpt.step
that is damaged or absent is refused with the reason; retention keeps intact steps; SIGKILL when
a save starts always resumes; the workdir lock refuses a holder's workdir and takes over a dead
run's record (with real processes: test_train's SIGKILL/SIGTERM test)."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax.numpy as jnp
import pytest
from conftest import compile_env
from test_train import MACHINE_KEYS, NO_SAMPLES, _config, _rows

from train import checkpoint, dit, workdir_lock

ROOT = Path(__file__).resolve().parents[1]
# 4 steps, checkpoints at steps 2 and 4 (and the held-out loss at step 3).
RUN = {"total_steps": 4, "ckpt.every_steps": 2, "log.progress": False}


def _cfg(**overrides):
    return _config("cogvideox_2b", **(RUN | overrides))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4) that tests copy and never change."""
    workdir = tmp_path_factory.mktemp("pristine") / "run"
    dit.train_and_evaluate(_cfg(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


def _copy(pristine, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir, ignore=shutil.ignore_patterns(workdir_lock.LOCK))
    return workdir


def _metrics(workdir) -> list[dict]:
    """The logged rows without the machine's figures (timings, memory)."""
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in _rows(workdir)]


def _truncate_tensor_file(step: Path) -> None:
    """Cut the largest array data file Orbax wrote for the state to half its size."""
    files = [p for p in (step / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def _intact(workdir) -> list[int]:
    """The steps of workdir/checkpoints that pass the structural check."""
    folder = workdir / "checkpoints"
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()]
    return sorted(s for s in steps if checkpoint.damage(str(folder / str(s))) is None)


# ---- Damaged checkpoints ----


@pytest.mark.slow
def test_truncated_tensor_file_resumes_from_the_previous_step(pristine, tmp_path, capsys):
    workdir = _copy(pristine, tmp_path)
    _truncate_tensor_file(workdir / "checkpoints" / "4")
    assert checkpoint.damage(str(workdir / "checkpoints" / "4")) is None  # only a restore sees it
    capsys.readouterr()
    dit.train_and_evaluate(_cfg(), str(workdir))
    out = capsys.readouterr().out
    aside = workdir / "checkpoints" / "damaged" / "4"
    want = rf"checkpoint step 4 is damaged \(its restore failed: OUT_OF_RANGE: [^\n]+\): moved it to {re.escape(str(aside))}\n"  # noqa: E501
    assert re.search(want, out), out
    assert "resumed from step 2 of" in out
    assert _metrics(workdir) == _metrics(pristine)  # steps 3 and 4 again, as they were
    assert _intact(workdir) == [2, 4] and aside.is_dir()
    assert (aside / "DAMAGED.txt").read_text().startswith("its restore failed: OUT_OF_RANGE")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, why",
    [
        ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA is missing"),
        ("state/_METADATA", "state/_METADATA is missing"),
        ("data/process_0-of-1.json", "data/ holds no iterator position (process_I-of-N.json)"),
    ],
)
def test_lost_metadata_file_resumes_from_the_previous_step(pristine, tmp_path, capsys, name, why):
    workdir = _copy(pristine, tmp_path)
    (workdir / "checkpoints" / "4" / name).unlink()
    capsys.readouterr()
    dit.train_and_evaluate(_cfg(), str(workdir))
    out = capsys.readouterr().out
    aside = workdir / "checkpoints" / "damaged" / "4"
    assert f"checkpoint step 4 is damaged ({why}): moved it to {aside}\n" in out, out
    assert "resumed from step 2 of" in out
    assert _metrics(workdir) == _metrics(pristine)
    assert _intact(workdir) == [2, 4]


def test_structural_check_names_what_is_wrong(tmp_path):
    # A real Orbax step of checkpoint.save (a small state, a Grain iterator, the meta JSON).
    mngr = checkpoint.manager(str(tmp_path), keep=2, async_save=False)
    data = iter(grain.MapDataset.range(8).to_iter_dataset())
    next(data)
    checkpoint.save(mngr, 3, {"w": jnp.ones((4, 4)), "step": jnp.int32(3)}, data, {"a": 1})
    mngr.close()
    step = tmp_path / "3"
    assert checkpoint.damage(str(step)) is None
    (step / "meta" / "metadata").write_text('{"transformer": ')
    assert checkpoint.damage(str(step)) == "meta/metadata does not parse (16 bytes, not valid JSON)"
    (step / "data" / "process_0-of-1.json").write_text("")
    assert checkpoint.damage(str(step)) == "data/process_0-of-1.json does not parse (empty)"
    os.rename(step / "data" / "process_0-of-1.json", step / "data" / "process_1-of-2.json")
    want = "data/ lacks the iterator position of process(es) [0] of 2"
    assert checkpoint.damage(str(step)) == want
    (step / "state" / "ocdbt.process_0" / "manifest.ocdbt").write_bytes(b"")
    want = "state/ocdbt.process_0/manifest.ocdbt is missing or empty"
    assert checkpoint.damage(str(step)) == want
    (step / "state" / "_METADATA").write_text("[]")
    assert checkpoint.damage(str(step)) == "state/_METADATA holds no JSON object"
    shutil.rmtree(step / "state")
    assert checkpoint.damage(str(step)) == "its state/ folder is missing"
    (step / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {"data": "grain"}}')
    assert checkpoint.damage(str(step)) == "_CHECKPOINT_METADATA names no 'state' item"
    # Moved aside before the manager opens: Orbax no longer sees the step.
    mngr = checkpoint.manager(str(tmp_path), keep=2)
    assert mngr.all_steps() == [] and (tmp_path / "damaged" / "3" / "DAMAGED.txt").is_file()
    mngr.close()


def test_export_and_sampling_pick_the_newest_intact_step(tmp_path, capsys):
    """checkpoint.step_folder (tools.convert run-to-*, tools.sample --model RUN) skips a damaged
    newest step with a line, refuses a named damaged one with the reason, and moves nothing."""
    ckpts = tmp_path / "checkpoints"
    mngr = checkpoint.manager(str(ckpts), keep=3, async_save=False)
    for step in (2, 4):
        data = iter(grain.MapDataset.range(8).to_iter_dataset())
        checkpoint.save(mngr, step, {"w": jnp.ones((4, 4)), "step": jnp.int32(step)}, data, {})
    mngr.close()
    assert checkpoint.step_folder(str(tmp_path)) == str(ckpts / "4")
    (ckpts / "4" / "data" / "process_0-of-1.json").unlink()
    assert checkpoint.step_folder(str(tmp_path)) == str(ckpts / "2")
    why = "data/ holds no iterator position (process_I-of-N.json)"
    assert f"checkpoint step 4 of {ckpts} is damaged ({why}): skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match=re.escape(f"{ckpts / '4'} is damaged: {why}")):
        checkpoint.step_folder(str(tmp_path), 4)
    assert checkpoint.step_folder(str(tmp_path), 2) == str(ckpts / "2")
    assert sorted(os.listdir(ckpts)) == ["2", "4"]


@pytest.mark.slow
def test_pinned_step_resumes_exactly_there_or_refuses_with_the_reason(pristine, tmp_path, capsys):
    workdir = _copy(pristine, tmp_path)
    folder = workdir / "checkpoints"
    # Newer intact steps beside the pinned one: the run's saves would collide with them.
    with pytest.raises(
        ValueError, match=r"ckpt.step=2: .* holds newer checkpoints \(steps \[4\]\)"
    ):
        dit.train_and_evaluate(_cfg(**{"ckpt.step": 2}), str(workdir))
    # Eval mode evaluates the pinned step, newer ones or not.
    got = dit.train_and_evaluate(_cfg(mode="eval", **{"ckpt.step": 2}), str(workdir))
    assert got["step"] == 2 and "eval_loss" in got
    # A damaged pinned step is refused, named with what is wrong, and left where it is.
    (folder / "4" / "state" / "_METADATA").unlink()
    with pytest.raises(ValueError) as err:
        dit.train_and_evaluate(_cfg(**{"ckpt.step": 4}), str(workdir))
    assert str(err.value) == f"ckpt.step=4: {folder / '4'} is damaged: state/_METADATA is missing"
    assert (folder / "4").is_dir() and not (folder / "damaged").exists()
    with pytest.raises(ValueError, match=rf"ckpt.step=3: there is no {re.escape(str(folder))}/3 "):
        dit.train_and_evaluate(_cfg(**{"ckpt.step": 3}), str(workdir))
    _truncate_tensor_file(folder / "2")
    with pytest.raises(ValueError, match=r"ckpt.step=2: .*/2 cannot be restored: OUT_OF_RANGE"):
        dit.train_and_evaluate(_cfg(**{"ckpt.step": 2}), str(workdir))
    # That run moved the damaged step 4 aside (any run does), though it refused the pinned 2.
    assert os.listdir(folder / "damaged") == ["4"]
    # If no step restores, nothing is moved: a fault of them all is likelier than two damaged.
    shutil.copytree(pristine / "checkpoints" / "4", folder / "4")
    _truncate_tensor_file(folder / "4")
    with pytest.raises(
        ValueError, match=r"no checkpoint in .* could be restored \(step 4: OUT_OF_"
    ):
        dit.train_and_evaluate(_cfg(), str(workdir))
    assert sorted(os.listdir(folder)) == ["2", "4", "damaged"]
    # Through the command line: one line, exit code 2 (in a copy: this process holds the lock
    # of the workdir it ran in until it ends).
    workdir, folder = _copy(workdir, tmp_path / "cli"), tmp_path / "cli" / "run" / "checkpoints"
    cmd = [sys.executable, "-m", "train", "--config=configs/cogvideox_2b.py:sft,runlocal"]
    cmd += [NO_SAMPLES]
    cmd += ["--workdir", str(workdir), "--config.ckpt.step=4", "--config.total_steps=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=compile_env(), capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[:3000]
    assert re.fullmatch(
        rf"error: ckpt.step=4: {re.escape(str(folder / '4'))} cannot be restored: OUT_OF_RANGE: .* "
        rf"\(traceback: {re.escape(str(workdir / 'error.txt'))}\)",
        lines[0],
    ), lines[0]


@pytest.mark.slow
def test_retention_keeps_intact_steps_when_the_newest_is_damaged(pristine, tmp_path, capsys):
    # keep=2 with step 4 damaged: had Orbax counted it, the save at 4 would be skipped (Orbax
    # saves only past its latest step) and the one at 6 would delete step 2, leaving 1 intact.
    workdir = _copy(pristine, tmp_path)
    _truncate_tensor_file(workdir / "checkpoints" / "4")
    dit.train_and_evaluate(_cfg(total_steps=6, **{"ckpt.keep": 2}), str(workdir))
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged" in out and "resumed from step 2 of" in out
    assert _intact(workdir) == [4, 6]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "damaged"]
    assert os.listdir(workdir / "checkpoints" / "damaged") == ["4"]  # kept for a look, not deleted


# ---- Processes: SIGKILL when a save starts, and one run per workdir ----


def _start(workdir: Path, *overrides) -> subprocess.Popen:
    """`python -m train` on the 2B runlocal config, its stdout and stderr into a log file."""
    cmd = [sys.executable, "-m", "train", "--config", "configs/cogvideox_2b.py:sft,runlocal"]
    cmd += ["--workdir", str(workdir), "--config.log.progress=False", NO_SAMPLES, *overrides]
    env = compile_env() | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    logs = sorted(workdir.parent.glob(f"{workdir.name}.*.log"))
    log = workdir.parent / f"{workdir.name}.{len(logs)}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _until(proc, ready, timeout=240) -> None:
    """Poll `ready()` until it holds; fails if `proc` ends first or time runs out."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.time() < deadline, proc.log.read_text()[-3000:]
        time.sleep(0.002)


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _temporary(folder: Path) -> set[str]:
    return (
        {n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n}
        if folder.exists()
        else set()
    )


@pytest.mark.slow
def test_sigkill_when_a_save_starts_always_resumes(tmp_path):
    workdir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [
        "--config.total_steps=1000",
        "--config.ckpt.every_steps=1",
        "--config.evals.every_steps=1000",
    ]
    resumed, interrupted, starts = None, 0, 0
    while interrupted < 3:  # three saves cut short (a save that won the race does not count)
        assert starts < 6, f"only {interrupted} of {starts} kills interrupted a save"
        stale = _temporary(folder)  # the killed save's folder, until the next manager removes it
        proc = _start(workdir, *args)
        starts += 1
        # Killed the moment a save's temporary folder appears, once a step has been committed.
        _until(proc, lambda old=stale: checkpoint._steps(str(folder)) and _temporary(folder) - old)
        _kill(proc)
        interrupted += bool(_temporary(folder) - stale)
        if resumed is not None:
            assert f"train state: resumed from step {resumed} of " in proc.log.read_text()
        resumed = max(checkpoint._steps(str(folder)))
        assert _intact(workdir) == sorted(checkpoint._steps(str(folder)))
    proc = _start(workdir, *args[1:], f"--config.total_steps={resumed + 1}")
    proc.wait(timeout=300)
    log = proc.log.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert f"train state: resumed from step {resumed} of " in log
    assert not _temporary(folder) and resumed + 1 in _intact(workdir)


def test_lock_refuses_a_holder_and_takes_over_a_dead_runs_record(tmp_path, capsys):
    host = socket.gethostname()
    # A live holder: the lock file locked (here by this process, through its own descriptor).
    busy = tmp_path / "busy"
    busy.mkdir()
    record = {"host": host, "pid": 12345, "since": "2026-01-01T00:00:00+00:00"}
    with open(busy / workdir_lock.LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record))
        f.flush()
        with pytest.raises(workdir_lock.Busy) as err:
            workdir_lock.take(str(busy))
    assert str(err.value) == (
        f"{busy} is in use by another run (host {host}, PID 12345, since "
        f"2026-01-01T00:00:00+00:00; lock file {busy / workdir_lock.LOCK}): one run per workdir, "
        "so stop that run or use another --workdir"
    )
    # The record of a run that was killed (the kernel dropped its lock): taken over, said once.
    workdir_lock.take(str(busy))
    assert capsys.readouterr().out == (
        f"took over {busy / workdir_lock.LOCK} from a run that ended without releasing it "
        f"(host {host}, PID 12345, since 2026-01-01T00:00:00+00:00)\n"
    )
    mine = json.loads((busy / workdir_lock.LOCK).read_text())
    assert mine["host"] == host and mine["pid"] == os.getpid()
    workdir_lock.take(str(busy))  # this process holds it already: nothing happens
    assert capsys.readouterr().out == ""
    with open(busy / workdir_lock.LOCK) as f:  # and the lock is the OS's
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        workdir_lock.release(str(busy))  # let go before the process ends: the record emptied
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (busy / workdir_lock.LOCK).read_text() == ""
