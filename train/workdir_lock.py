"""One run per workdir: `take(workdir)` holds WORKDIR/.lock until this process ends (or
`release(workdir)`).

The lock is the operating system's (`fcntl.flock`, exclusive, not waiting): the kernel drops it
when the process that holds it ends, however it ends (SIGKILL, a lost node), so a dead run's lock
is never in the way and nothing has to decide when a lock is stale. The file records who holds it
(host, PID, since when) for the message a second run gets (`Busy`, a ValueError: one line and
exit code 2 from `python -m train`). A run that ends normally empties the record; a new run that
finds the record of a run that did not (it was killed) takes over with a one-line notice.

A multi-process run is one run: process 0 takes the lock for all of its processes (they share the
workdir, and only process 0 locks), and every process learns whether it was taken, so that all of
them stop at once when it was not. On a file system without `flock` the record decides instead: a
holder on this host whose PID is alive keeps the workdir; a holder that cannot be checked (another
host) or is dead is taken over, with the notice. Where `flock` does not reach across hosts (some
FUSE mounts), two hosts can both take it: the lock then guards against a second run on one host.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np

LOCK = ".lock"
# The lock files this run holds: real path -> open descriptor (process 0) or None (the others).
_held: dict[str, int | None] = {}


class Busy(ValueError):
    """The workdir is held by a live run."""


def take(workdir: str) -> None:
    """Hold WORKDIR/.lock for this run (until the process ends; taking it again is a no-op), or
    raise `Busy` naming its holder. Every process of a run calls it."""
    path = os.path.realpath(os.path.join(workdir, LOCK))
    if path in _held:
        return
    taken, notice = _lock(path) if jax.process_index() == 0 else (True, None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
    if not taken:
        raise Busy(
            f"{workdir} is in use by another run ({holder(path)}; lock file {path}): one run "
            "per workdir, so stop that run or use another --workdir"
        )
    _held.setdefault(path, None)  # (process 0 recorded its descriptor)
    if notice:
        print(notice, flush=True)


def release(workdir: str) -> None:
    """Let go of WORKDIR/.lock before this process ends (a notebook done with a run)."""
    _empty_and_close(_held.pop(os.path.realpath(os.path.join(workdir, LOCK)), None))


def holder(path: str) -> str:
    """Who the lock file `path` says holds it: 'host H, PID P, since T'."""
    return _who(_read(path))


def _who(record: dict) -> str:
    if not record:
        return "its holder has not recorded itself yet"
    return f"host {record.get('host')}, PID {record.get('pid')}, since {record.get('since')}"


def _lock(path: str) -> tuple[bool, str | None]:
    """(taken, notice) for this process; the notice when a dead run's record was taken over."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live process holds it
        os.close(fd)
        return False, None
    except OSError:  # no flock on this file system: the record decides
        if _alive_here(_read(path)):
            os.close(fd)
            return False, None
    previous = _read(path)
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": since}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    _held[path] = fd
    if not previous:
        return True, None
    return True, f"took over {path} from a run that ended without releasing it ({_who(previous)})"


def _read(path: str) -> dict:
    """The lock file's record ({} when empty, missing or unreadable)."""
    try:
        with open(path) as f:
            text = f.read().strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive_here(record: dict) -> bool:
    """The record names a live process on this host."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@atexit.register
def _release_all() -> None:
    """At a normal exit: empty the records (no takeover notice for the next run), then unlock."""
    for fd in _held.values():
        _empty_and_close(fd)
    _held.clear()


def _empty_and_close(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # while still locked
        os.close(fd)  # unlocks
    except OSError:
        pass
