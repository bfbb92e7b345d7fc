"""The extraction writer: a thread that owns the HDF5 file (writes stay off the compute
path), the cache's identity attributes, and the one-line disk errors."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ekx import EkxError, __version__, epic
from ekx.cache import dense, store
from ekx.extract import backbones

if TYPE_CHECKING:
    from ekx.extract.pipeline import ExtractConfig


class WriterThread(threading.Thread):
    def __init__(self, writer: store.Writer):
        super().__init__(daemon=True)
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=256)
        self.error: Exception | None = None

    def run(self):
        stop = False
        while not stop:
            items = [self.q.get()]
            while len(items) < 64:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is None for i in items)
            items = [i for i in items if i is not None]
            if self.error is None and items:
                try:
                    self.writer.write(
                        [i[1:] for i in items if i[0] == "done"], [i[1:] for i in items if i[0] == "failed"]
                    )
                except Exception as e:
                    self.error = e

    def put(self, item):
        if self.error is not None:
            raise disk_error(self.writer.path, self.error)
        self.q.put(item)

    def finish(self):
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise disk_error(self.writer.path, self.error)


def disk_error(path: Path, e: Exception) -> EkxError:
    text = str(e)
    if "No space" in text or "errno = 28" in text or getattr(e, "errno", None) == 28:
        return EkxError(
            f"disk full while writing {path}: free some space, then re-run the same command "
            "to resume (segments written so far are kept)"
        )
    return EkxError(f"cannot write {path}: {type(e).__name__}: {text.splitlines()[0] if text else ''}")


def cache_attrs(
    cfg: ExtractConfig,
    bb: backbones.Backbone,
    weights_id: str,
    precision: str,
    device: torch.device,
    ann: epic.Annotations,
    ann_path: Path,
    calibration: str,
    weights_path: str,
    inputs: dict,
) -> dict:
    """Every root attribute of a new cache; ``inputs``: `identity.input_attrs` of this pass
    (backbone, preprocessing, source, decode path, video files)."""
    import decord
    import torchvision

    verbs, nouns = ann.verbs(), ann.nouns()
    return {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "weights": weights_id,
        "weights_path": weights_path,
        "feature_dim": bb.dim,
        "frames_per_segment": cfg.frames,
        "views": cfg.views,
        "seed": cfg.seed,
        "augmentation": "view 0 clean; views 1.. random resized crop (0.35-1), hflip 0.5, "
        "brightness/contrast/saturation 0.6-1.4, same for all frames of a segment",
        "precision": precision,
        "dtype": "float16",
        "annotation_file": ann_path.name,
        "annotation_path": str(Path(ann_path).resolve()),  # where stage 2 finds a dense store's segments
        "annotation_sha256": store.sha256_file(ann_path),
        "bn_calibration": calibration,
        # the class lists travel with the cache: stage 2 needs no annotation directory
        "num_verbs": len(verbs),
        "num_nouns": len(nouns),
        "verb_classes": list(verbs.keys),
        "noun_classes": list(nouns.keys),
        "split": cfg.split,
        "shard": f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else "",
        "ekx_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "decord_version": decord.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        **inputs,
        **(dense.describe(dense.Rate.parse(cfg.dense), cfg.dense_span, cfg.dense_margin) if cfg.dense else {}),
    }
