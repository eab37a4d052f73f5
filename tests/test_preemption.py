"""Preemption (train/preemption.py) in process: SIGINT stops a run after the step in flight with a
checkpoint of that step, and every logged row says where its time went (goodput). A real
`python -m train` stopped by SIGTERM and resumed: test_train's SIGKILL/SIGTERM test; two
processes that agree on the step: test_multihost."""

import os
import signal
import threading
import time

import pytest
from test_train import STOPPED, TIME_KEYS, _config, _rows

from train import dit, metrics, preemption, watchdog


def test_sigint_in_process_stops_after_the_step_and_goodput_adds_up(tmp_path):
    """Ctrl-C (SIGINT) during an in-process run: Preempted at a step with its checkpoint; every
    logged row says where its interval's time went."""
    cfg = _config("cogvideox_2b", total_steps=400, **{"ckpt.every_steps": 1000})
    before = signal.getsignal(signal.SIGINT)

    def interrupt_once_stepping():
        path = tmp_path / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= 6:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    timer = threading.Thread(target=interrupt_once_stepping, daemon=True)
    timer.start()
    with pytest.raises(preemption.Preempted) as stop:
        dit.train_and_evaluate(cfg, str(tmp_path))
    timer.join()
    e = stop.value
    assert e.signum == signal.SIGINT and e.exit_code == 130
    assert 6 <= e.step < 400
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(e.step)]
    assert STOPPED.match(str(e))
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, e.step + 1))
    # The parts add up to the interval within 5%; an interval here is one step of a tiny model
    # (milliseconds), where the loop's own bookkeeping (~1-2 ms, in no part) is allowed for.
    for r in rows:
        parts = [r[f"time_{p}_s"] for p in metrics.PARTS]
        assert all(x >= 0 for x in parts) and set(TIME_KEYS) <= set(r)
        assert sum(parts) == pytest.approx(r["time_interval_s"], rel=0.05, abs=0.005), r
        assert 0 < r["goodput"] <= 1
    total = sum(r[f"time_{p}_s"] for r in rows for p in metrics.PARTS)
    assert total == pytest.approx(sum(r["time_interval_s"] for r in rows), rel=0.05)
    assert rows[0]["time_compile_s"] > rows[-1]["time_compile_s"]  # the first step compiles
    assert any(r["time_eval_s"] > 0 for r in rows if "eval_loss" in r)


def test_watchdog_writes_every_threads_stack_once_per_hung_step(tmp_path):
    """A step over `factor` x the median of the recent steps (after the warm-up) gets every
    thread's Python stack written, once; compiling (paused) does not count, the run goes on."""
    out = open(tmp_path / "stderr.txt", "w+")  # faulthandler writes to a real file
    with watchdog.Watchdog(3.0, warmup=3, poll_s=0.01, out=out) as dog:
        for step in range(1, 4):
            dog.begin(step)
            time.sleep(0.02)
            dog.end()
        assert dog.limit() == pytest.approx(0.06, rel=0.5)
        dog.begin(4)
        dog.pause()  # a new batch shape compiling: not part of the step
        time.sleep(0.3)
        dog.resume()
        dog.end()
        out.flush()
        assert out.tell() == 0
        dog.begin(5)
        time.sleep(0.4)  # hung: over 3 x 0.02 s
        dog.end()
    text = (tmp_path / "stderr.txt").read_text()
    assert text.count("watchdog: step 5 has taken") == 1, text
    assert "test_watchdog_writes_every_threads_stack_once_per_hung_step" in text  # this stack
    assert "Thread 0x" in text and "_watch" in text  # every thread, the watchdog's own too
    off = watchdog.Watchdog(0.0)
    with off:
        assert off._thread is None  # factor 0: no thread
