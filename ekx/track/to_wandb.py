"""Weights & Biases: offline unless the user's own W&B settings choose (WANDB_MODE, or a mode
in their settings file, e.g. after `wandb online`); offline runs live in <run>/wandb/ and go
up with `wandb sync <run>/wandb/offline-run-*`.

History at the global training step (W&B wants one increasing step per run, also across a
resume), with ``epoch`` as the x axis of every epoch figure; the configuration as the run's
config; the features' identity as tags (short ones) and config; the best epoch in the run's
summary; curves.png, metrics.jsonl and config.toml as one artifact. A sweep's trials share
the sweep's name as their group; a pruned trial is tagged pruned. A resumed run continues
the same run id (resume="allow")."""

from __future__ import annotations

import configparser
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ekx.track import base

MAX_TAG = 64  # W&B refuses longer tags


def user_mode() -> bool:
    """Whether the user's W&B settings choose the mode (then ekx does not force offline)."""
    if os.environ.get("WANDB_MODE"):
        return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    for path in (config_dir / "settings", Path("wandb") / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        if parser.has_option("default", "mode"):
            return True
    return False


def records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (.wandb): LevelDB's log framing (a 7-byte header
    ":W&B", then 32 KiB blocks of chunks: crc32, length, type), each record W&B's own protobuf
    (wandb_internal_pb2.Record). Stops at a chunk cut short or corrupt (a process killed while
    its writer held part of a record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (crc, n, kind) == (0, 0, 0):  # a block's zero padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        if len(chunk) < n or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        buf, pos = buf + chunk, pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf, no stubs
            record.ParseFromString(buf)
            buf = b""
            yield record


def logged_step(wandb_dir: Path, run_id: str) -> int:
    """The last history step of a run's offline files (-1: none): what reached the disk of an
    earlier process, which a kill -9 may have stopped before W&B flushed the rest."""
    steps = [
        r.history.step.num
        for f in Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        for r in records(f)
        if r.WhichOneof("record_type") == "history"
    ]
    return max(steps, default=-1)


class Backend(base.Backend):
    def start(self, run: base.RunInfo) -> dict[str, Any]:
        import wandb

        self.files: list[Path] = []
        self.name = run.name
        settings = wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            disable_git=True,
            save_code=False,
            x_save_requirements=False,
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ekx"),
            name=f"{run.group}/{run.name}" if run.group else run.name,
            group=run.group or None,
            job_type=run.kind,
            dir=None if os.environ.get("WANDB_DIR") else str(run.run_dir),
            mode=None if user_mode() else "offline",
            id=(run.resume or {}).get("id"),
            resume="allow" if run.resume else None,
            settings=settings,
        )
        self.run.define_metric("epoch")
        for prefix in ("train/*", "val/*", "epoch/*"):
            self.run.define_metric(prefix, step_metric="epoch")
        state: dict[str, Any] = {"id": self.run.id, "dir": str(self.run.dir)}
        if run.resume and self.run.settings.mode == "offline":  # what the earlier processes' files hold
            state["held_step"] = logged_step(Path(self.run.dir).parent.parent, self.run.id)
        return state

    def log(self, metrics: list[tuple[int, dict[str, float]]], epoch: int | None = None) -> None:
        for step, values in metrics:
            self.run.log({**values, **({"epoch": epoch} if epoch is not None else {})}, step=step)

    def params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def tags(self, tags: dict[str, str]) -> None:
        short = [f"{k}:{v}" for k, v in tags.items() if len(f"{k}:{v}") <= MAX_TAG]
        self.run.tags = (*(self.run.tags or ()), *short)
        self.run.config.update({f"tag/{k}": v for k, v in tags.items()}, allow_val_change=True)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def artifact(self, path: Path) -> None:
        self.files.append(path)  # one artifact of the run's files, at finish

    def table(self, key: str, columns: list[str], rows: list[list[Any]], markdown: str) -> None:
        import wandb

        header: list[str | int] = [*columns]
        self.run.log({key: wandb.Table(columns=header, data=rows)}, step=0)

    def finish(self, status: str) -> None:
        import wandb

        if self.files:
            art = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.name}-{self.run.id}"), type="run-files")
            for path in self.files:
                art.add_file(str(path))
            self.run.log_artifact(art)
        if status != "finished":
            self.run.tags = (*(self.run.tags or ()), status)
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("finished", "pruned") else 1)
