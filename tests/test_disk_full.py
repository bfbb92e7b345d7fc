"""Disk full during training: every run file is replaced atomically, so the previous
best.pt / last.pt / config.toml stay loadable, and the error is one line."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import make_cache

from ekx import EkxError
from ekx.heads import checkpoint as ck
from ekx.heads import config as hc
from ekx.heads import runlog
from ekx.heads import train as tr


def _cfg(caches, **kw) -> hc.TrainConfig:
    base = {
        "head": "lstm",
        "train_features": str(caches[0]),
        "val_features": str(caches[1]),
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-3,
        "frames": 4,
    }
    return hc.TrainConfig(**{**base, **kw})


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_previous_checkpoints_loadable(tmp_path, monkeypatch):
    caches = (make_cache(tmp_path / "train.h5", n=48), make_cache(tmp_path / "val.h5", n=16, seed=1))
    data = tr.load_data(caches[0], caches[1], "cpu")
    run = tmp_path / "run"
    tr.run(_cfg(caches), run, data)
    before = {n: (run / n).read_bytes() for n in ("best.pt", "last.pt", "config.toml", "metrics.jsonl")}
    real_save = torch.save

    def half_then_full(obj, f, *a, **kw):  # a partial file, then the disk is full
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        _enospc()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(EkxError) as e:
        tr.run(_cfg(caches, epochs=2), run, data, resume=True)
    msg = str(e.value)
    assert "No space left on device" in msg and "untouched" in msg and "\n" not in msg, msg
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("best.pt", "last.pt"):
        assert (run / name).read_bytes() == before[name]
        assert ck.load_checkpoint(run / name)["epoch"] == 1
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    # the whole-file writers (config.toml, the log rewrite, curves.png, done.json) go through
    # write_atomic: a full disk leaves the old file as it was
    config = (run / "config.toml").read_bytes()  # as the resumed run wrote it
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(EkxError, match="No space left"):
        runlog.write_config(run, _cfg(caches))
    assert (run / "config.toml").read_bytes() == config
    monkeypatch.undo()
    # a full disk mid-append leaves a torn last line: it is skipped, and resume completes
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 2, "val_ac')
    assert len(runlog.read_metrics(run)) == 1
    tr.run(_cfg(caches, epochs=2), run, data, resume=True)
    assert [r["epoch"] for r in runlog.read_metrics(run)] == [1, 2]
