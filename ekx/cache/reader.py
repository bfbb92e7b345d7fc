"""Reading a cache for stage 2: metadata and labels, and the features of a split as
one array - a single bulk read, or a memory map - never per-item h5py reads.

Plain h5py works too:

    with h5py.File("features/resnet50/train.h5") as f:
        x = f["features"][...]            # [N, V, K, D] float16
        ok = f["status"][...] == 1        # done rows
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ekx import EkxError
from ekx.cache import store


@dataclass
class Cache:
    path: Path
    attrs: dict
    narration_id: list[str]
    video_id: list[str]
    verb_class: np.ndarray
    noun_class: np.ndarray
    status: np.ndarray
    frame_index: np.ndarray
    shape: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))
    time: np.ndarray | None = None  # [N, K] s: a dense store's position times (ekx.cache.dense)

    @property
    def dense(self) -> bool:
        return self.attrs.get("kind") == "dense"

    @property
    def done(self) -> np.ndarray:
        return self.status == store.DONE

    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in store.STATUS_NAMES.items()}

    def features(self, mmap: bool = False) -> np.ndarray:
        """All rows' features [N, V, K, D] float16 (pending/failed rows hold garbage: use .done).

        Chunks of an ekx cache are allocated in row order at creation, so the dataset is one
        contiguous run of bytes: it is read with one sequential read (h5py's chunk-by-chunk
        read_direct manages ~0.27 GiB/s on 67k chunks here), or with mmap=True mapped
        read-only - pages are read when touched and shared between processes. Files whose
        chunks are not contiguous fall back to h5py.
        """
        with h5py.File(self.path, "r") as f:
            dset = f["features"]
            offset = _contiguous_offset(dset) if dset.size else None
            if offset is not None and mmap:
                return np.memmap(self.path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)
            if offset is not None:
                return np.fromfile(self.path, dtype=dset.dtype, count=dset.size, offset=offset).reshape(dset.shape)
            out = np.empty(dset.shape, dset.dtype)
            if out.size:
                dset.read_direct(out)
            return out


def _contiguous_offset(dset: h5py.Dataset) -> int | None:
    """File offset of the data if its chunks lie back to back in row order, else None."""
    if dset.chunks is None:
        return dset.id.get_offset()
    n = dset.id.get_num_chunks()
    if n != dset.shape[0] or n == 0 or dset.chunks[0] != 1:
        return None
    first = dset.id.get_chunk_info(0)
    size = first.size
    for i in (n // 2, n - 1):
        info = dset.id.get_chunk_info(i)
        if info.byte_offset != first.byte_offset + i * size or info.filter_mask != 0:
            return None
    return first.byte_offset


def open_cache(path: Path) -> Cache:
    path = Path(path)
    if not path.is_file():
        raise EkxError(f"{path}: no feature cache here; run `ekx extract` first (or check --features)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EkxError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if f.attrs.get("format") != store.FORMAT:
            raise EkxError(f"{path}: not an ekx feature cache (format attribute {f.attrs.get('format')!r})")
        if int(f.attrs.get("format_version", -1)) > store.VERSION:
            raise EkxError(
                f"{path}: cache format version {f.attrs['format_version']} is newer than this "
                f"ekx understands ({store.VERSION}); upgrade ekx"
            )
        attrs = store.read_attrs(f.attrs)
        return Cache(
            path,
            attrs,
            store.decode_strings(f["narration_id"][...]),
            store.decode_strings(f["video_id"][...]),
            f["verb_class"][...],
            f["noun_class"][...],
            f["status"][...],
            f["frame_index"][...],
            tuple(f["features"].shape),
            f["time"][...] if "time" in f else None,
        )


def failures(path: Path) -> list[tuple[str, str]]:
    """(narration_id, reason) of failed rows."""
    c = open_cache(path)
    rows = np.flatnonzero(c.status == store.FAILED)
    with h5py.File(path, "r") as f:
        reasons = f["failure"][...]
    return [(c.narration_id[r], reasons[r].decode("utf-8", "replace")) for r in rows]
