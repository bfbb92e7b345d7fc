"""Who is writing a cache: `<cache>.lock` beside it, holding an flock for as long as an
extract run has the cache open, and a record (host, pid, start time) saying whose it is.

The flock is the truth: the kernel drops it when its holder dies, kill -9 included, so a
lock left by a killed run is taken over silently and a resume is never blocked. The record
is what the refusal shows a second run (host and pid, and how to check them). HDF5's own
file lock would also stop the second writer, but with `BlockingIOError: unable to lock file`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ekx import EkxError
from ekx.heads import runlock


def lock_path(cache: Path) -> Path:
    return Path(cache).with_name(Path(cache).name + ".lock")


class CacheLock:
    def __init__(self, cache: Path, fh):
        self.cache, self.fh = Path(cache), fh

    def release(self) -> None:
        if self.fh.closed:
            return
        with contextlib.suppress(OSError):
            lock_path(self.cache).unlink()  # while still holding it: no one else has it yet
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def read(cache: Path) -> dict:
    try:
        return json.loads(lock_path(cache).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _dead_here(rec: dict) -> bool:
    """The record's owner ran on this host and is gone."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(cache: Path) -> CacheLock:
    """Hold `<cache>.lock` for this process, or stop with who holds it and what to do."""
    path = lock_path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 15
    while True:
        fh = open(path, "a+")  # held open for the whole run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            rec = read(cache)
            host, pid = rec.get("host", "an unknown host"), rec.get("pid", "?")
            if _dead_here(rec) and time.monotonic() < deadline:
                # the owner was killed, but its forked decode workers inherited the locked
                # descriptor and are still dying (they follow their parent by PR_SET_PDEATHSIG)
                time.sleep(0.2)
                continue
            raise EkxError(
                f"{cache}: another process (pid {pid} on {host}, since {time.ctime(rec.get('since', 0))}) is "
                f"writing this cache; check it with `ps -p {pid}` on {host}. Wait for it to finish (a second run "
                f"then resumes whatever it left), or stop it (kill {pid}) and run again"
            ) from None
        # the holder we waited on may have unlinked the file before unlocking: lock the current one
        try:
            same = os.fstat(fh.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({**runlock._me(), "since": time.time()}))
    fh.flush()
    return CacheLock(cache, fh)
