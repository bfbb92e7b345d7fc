"""A content-addressed store of the BatchNorm statistics that `backbones.calibrate_batchnorm`
measures for random weights: keyed by every parameter and buffer of the network, the
calibration inputs, the torch version and thread count, so a hit is exactly what calibrating
again would give. `ekx extract` looks a calibration up before decoding its inputs too
(`plan_path`): by what the inputs are made of - the bytes of each video, the segments, the
settings that decode and preprocess them - so a hit skips the decoding as well.

Off unless ``EKX_CALIBRATION_CACHE`` names a directory. The test suite sets it: its ~150
extractions of the same synthetic data with ``--weights none`` calibrated the same random
networks again and again (the calibration's train-mode fp32 forward was 53% of a
two-backbone extraction test's time, and R(2+1)D's 64 clips cost about a minute on one core).
A user rarely extracts with random weights twice, so nothing is written by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ekx import EkxError

ENV = "EKX_CALIBRATION_CACHE"


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, any dtype (bf16 has no numpy twin)


def key(model: nn.Module, batches: list[torch.Tensor], plan: str = "") -> str:
    """What the statistics depend on: the network (class, every tensor, BatchNorm buffers just
    reset), the inputs in their batches (or the ``plan`` that makes them), and what could
    change the last bits of the sums."""
    h = hashlib.sha256(f"{type(model).__qualname__} {torch.__version__} {torch.get_num_threads()} threads".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    for x in batches:
        _update(h, x)
    h.update(plan.encode())
    return h.hexdigest()


def path_for(model: nn.Module, batches: list[torch.Tensor]) -> Path | None:
    root = os.environ.get(ENV)
    return Path(root) / f"{key(model, batches)}.pt" if root else None


def plan_path(model: nn.Module, plan: Callable[[], str | None]) -> Path | None:
    """Where the calibration described by ``plan()`` is kept (see `ekx.extract.inputs.calibration_key`),
    None when the store is off or ``plan()`` cannot describe its inputs (called only when on)."""
    root = os.environ.get(ENV)
    text = plan() if root else None
    return Path(root) / f"plan-{key(model, [], text)}.pt" if root and text is not None else None


@contextlib.contextmanager
def locked(path: Path | None) -> Iterator[None]:
    """Held while one process looks ``path`` up and, on a miss, measures and stores it: a
    second process with the same key waits, then reads what the first stored."""
    if path is None:
        yield
        return
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(f".{path.name}.lock"), "w")
    except OSError as e:
        raise _unwritable(path, e) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def load(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: calibrate again (and write it anew)
        return None


def save(path: Path | None, state: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: concurrent processes each write the same bytes
    except OSError as e:
        raise _unwritable(path, e) from None


def _unwritable(path: Path, e: OSError) -> EkxError:
    return EkxError(
        f"{ENV}={path.parent}: cannot keep the calibrated BatchNorm statistics there ({e.strerror or e}); "
        f"point it at a writable folder, or unset it"
    )
