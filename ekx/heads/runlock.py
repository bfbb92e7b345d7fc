"""Who is training a run directory: a lock record (`owner.json`: pid, host, start time,
heartbeat) so that a second sweep on the same directory refuses a run another live process
is training, and a run whose trainer was killed (kill -9, a lost SLURM node) can be taken
over and resumed.

Liveness: on the same host the pid is checked directly (with its start time, so a reused
pid is not mistaken for the trainer); on another host (SLURM workers sharing the runs
folder) the record's heartbeat - rewritten every HEARTBEAT seconds by a thread - must be
younger than STALE seconds. Check-and-claim runs under an flock on a mutex file of the
sweep, which the kernel releases when its holder dies, so two workers never claim one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ekx import EkxError

RECORD = "owner.json"
FAILED = "failed.json"  # the error a run stopped on (`ekx compare` shows the run as failed)
HEARTBEAT = 10.0
STALE = 60.0  # seconds without a heartbeat before a record of another host counts as dead


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # no record, or one cut short by a kill: nobody holds the run


def alive(record: dict | None) -> bool:
    """Is the process a record names still training?"""
    if not record:
        return False
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, another user's
        return not record.get("start") or _start_time(pid) == record.get("start")
    return time.time() - float(record.get("beat", 0)) < STALE


def describe(record: dict) -> str:
    return f"pid {record.get('pid')} on {record.get('host')} (since {time.ctime(record.get('since', 0))})"


@contextlib.contextmanager
def mutex(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if absent); released by the kernel if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def slot(prefix: Path, wanted: int) -> Iterator[int]:
    """The lowest number from ``wanted`` up that no other live process holds, held until exit:
    an flock on ``<prefix>-<n>.lock``, which the kernel frees when its holder dies (kill -9
    too). Two searches started on one study with the same --worker thus get distinct worker
    numbers, and so distinct sampler seeds, instead of proposing the same trials in lockstep."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    n = wanted
    while True:
        fh = open(prefix.with_name(f"{prefix.name}-{n}.lock"), "a")  # held until exit: the flock lives with it
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            fh.close()
            n += 1
    try:
        yield n
    finally:
        fh.close()  # closing the descriptor drops the flock


def _write(run_dir: Path, record: dict) -> None:
    tmp = run_dir / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / RECORD)  # atomic: a reader sees the old or the new record


class RunLock:
    """This process trains `run_dir`; a daemon thread keeps the heartbeat fresh."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.record = {**_me(), "since": time.time(), "beat": time.time()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            if (read(self.run_dir) or {}).get("pid") != self.record["pid"]:
                return  # released or taken over: stop touching it
            self.record["beat"] = time.time()
            with contextlib.suppress(OSError):
                _write(self.run_dir, self.record)

    def release(self) -> None:
        self._stop.set()
        current = read(self.run_dir)
        if current and current.get("pid") == self.record["pid"] and current.get("host") == self.record["host"]:
            with contextlib.suppress(OSError):
                (self.run_dir / RECORD).unlink()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind, error, tb) -> None:
        # an error (not an interrupt: that run is resumable as it stands) is kept beside the run
        if isinstance(error, Exception) and getattr(error, "track_status", "failed") == "failed":
            with contextlib.suppress(OSError):
                (self.run_dir / FAILED).write_text(json.dumps({"error": f"{type(error).__name__}: {error}"[:2000]}))
        self.release()


def take(run_dir: Path) -> RunLock | None:
    """Take `run_dir` unless another live process holds it (then None); the caller holds the mutex."""
    run_dir = Path(run_dir)
    if alive(read(run_dir)):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)  # tried again: no longer a failed run
    lock = RunLock(run_dir)
    _write(run_dir, lock.record)
    lock._thread.start()
    return lock


def claim(run_dir: Path, mutex_file: Path) -> RunLock | None:
    with mutex(mutex_file):
        return take(run_dir)


def claim_or_refuse(run_dir: Path, mutex_file: Path) -> RunLock:
    lock = claim(run_dir, mutex_file)
    if lock is None:
        record = read(run_dir) or {}
        raise EkxError(
            f"{run_dir} is being trained by {describe(record)}: wait for it to finish, or stop that "
            f"process (kill {record.get('pid')}) and run again - the run then resumes from its last.pt"
        )
    return lock
