"""TensorBoard: event files in <run>/tensorboard/ (PyTorch's SummaryWriter), so
`tensorboard --logdir runs` shows every run, and a sweep's trials as its sub-directories.

Scalars by tag (step/*, train/*, val/*, epoch/*: epoch figures at the epoch number, step
points at the global step), the configuration in the HParams dashboard, the features'
identity, the best epoch, the status and config.toml as text, curves.png as an image. A
resumed run opens the same directory with purge_step: TensorBoard drops what an earlier
process wrote past the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ekx.track import base

# the figures the HParams dashboard shows beside each configuration
HPARAM_METRICS = ("val/action_top1", "val/verb_top1", "val/noun_top1", "val/loss")
MAX_TEXT = 65536


def _table(values: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in values.items())


class Backend(base.Backend):
    def start(self, run: base.RunInfo) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run.run_dir / "tensorboard"
        self.writer = SummaryWriter(str(log_dir), purge_step=run.first_step if run.resume else None)
        self.said: dict[str, str] = {}  # tags so far: the text is rewritten whole (the last one shows)
        return {"log_dir": str(log_dir)}

    def log(self, metrics: list[tuple[int, dict[str, float]]], epoch: int | None = None) -> None:
        for step, values in metrics:
            for k, v in values.items():
                self.writer.add_scalar(k, v, epoch if epoch is not None else step)
        if epoch is not None:  # an epoch is whole on disk, as its checkpoint (the writer queues events)
            self.writer.flush()

    def params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written into this run's own file (SummaryWriter.add_hparams would open a sub-run)
        writer = self.writer._get_file_writer()
        for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary)
        self.writer.add_text("config", _table(params))

    def tags(self, tags: dict[str, str]) -> None:
        self.said.update(tags)
        if self.said:
            self.writer.add_text("tags", _table(self.said))

    def summary(self, values: dict[str, float]) -> None:
        self.writer.add_text("best", _table(values))

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":  # curves.png: made by matplotlib, so its Pillow is there
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                self.writer.add_image(path.stem, np.asarray(img.convert("RGB")), dataformats="HWC")
        elif path.suffix != ".jsonl":  # metrics.jsonl is the scalars already
            self.writer.add_text(path.name, "```\n" + path.read_text()[:MAX_TEXT] + "\n```")

    def table(self, key: str, columns: list[str], rows: list[list[Any]], markdown: str) -> None:
        self.writer.add_text(key, markdown[:MAX_TEXT])

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()
