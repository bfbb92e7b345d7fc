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
        return {"id": self.run.id, "dir": str(self.run.dir)}

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
