"""Two extract runs on one cache: the second stops with the owner's host and pid; a lock
left by a killed run (kill -9) is taken over silently."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ekx import EkxError
from ekx.cache import lock
from ekx.extract.pipeline import ExtractConfig, extract

BASE = {"split": "validation", "weights": "none", "frames": 4, "batch_size": 4, "workers": 1, "limit": 2}


def run(data: Path, out: Path):
    cfg = ExtractConfig(**BASE, out=out)
    return extract(cfg, data / "annotations", data / "videos", out.parent, warn=lambda m: None)


def test_second_writer_is_told_who_holds_the_cache(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from ekx.cache import lock; held = lock.acquire({str(out)!r}); print('held', flush=True); "
            "import time; time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(EkxError) as e:
            run(synth_data, out)
        msg = str(e.value)
        assert "another process" in msg and f"pid {holder.pid} on {socket.gethostname()}" in msg, msg
        assert f"ps -p {holder.pid}" in msg and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock is stale, and the same command now runs
    assert run(synth_data, out).done == 2
    assert not lock.lock_path(out).exists()


def test_stale_lock_record_of_a_dead_pid_does_not_block(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "host": socket.gethostname(), "start": "1", "since": 0}
    lock.lock_path(out).write_text(json.dumps(record))
    assert run(synth_data, out).done == 2
    assert not lock.lock_path(out).exists() and os.path.exists(out)
