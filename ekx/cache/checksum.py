"""Per-row checksums of a cache's features: HDF5 stores none for our uncompressed chunks,
so bit rot on a network file system, an interrupted copy or a flipped block would go
unseen. Each row's crc32 (of its float16 bytes, exactly as stored) is written with the
row, before its status, and `ekx cache verify` recomputes it.

Caches of format version 1 have no `checksum` dataset: they still read and resume, and
verify says it cannot check them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np

from ekx.cache import store

DATASET = "checksum"
SCAN_BYTES = 64 << 20  # one sequential read per 64 MiB: verify runs at disk speed
SHOW = 10  # narration ids named in a verify message


def row_crc(feats: np.ndarray) -> int:
    """crc32 of one row's features as stored (float16, C order)."""
    return zlib.crc32(np.ascontiguousarray(feats, dtype=np.float16).data)


def _row_blocks(path: Path, dset: h5py.Dataset):
    """(first row, [rows, V, K, D] float16) blocks of the whole dataset, read sequentially:
    raw reads when chunks are contiguous (see reader._contiguous_offset), else via h5py."""
    from ekx.cache.reader import _contiguous_offset

    n = dset.shape[0]
    row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
    step = max(1, SCAN_BYTES // max(row_bytes, 1))
    offset = _contiguous_offset(dset) if dset.size else None
    if offset is None:
        for lo in range(0, n, step):
            yield lo, dset[lo : lo + step]
        return
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        for lo in range(0, n, step):
            rows = min(step, n - lo)
            buf = np.empty((rows, *dset.shape[1:]), dset.dtype)
            fh.readinto(memoryview(buf).cast("B"))  # type: ignore[arg-type]
            yield lo, buf


def corrupt_rows(path: Path) -> np.ndarray | None:
    """Rows marked done whose features no longer match their checksum; None if the cache has
    no checksums (format version 1)."""
    with h5py.File(path, "r") as f:
        if DATASET not in f:
            return None
        done = f["status"][...] == store.DONE
        want = f[DATASET][...]
        bad: list[int] = []
        for lo, block in _row_blocks(path, f["features"]):
            for j in np.flatnonzero(done[lo : lo + len(block)]):
                if zlib.crc32(block[j].data) != want[lo + j]:
                    bad.append(lo + int(j))
    return np.array(bad, dtype=np.int64)


def check(path: Path, narration_id: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """(problems, warnings, corrupt rows) for `ekx cache verify`."""
    bad = corrupt_rows(path)
    if bad is None:
        return (
            [],
            [
                "no feature checksums in this cache (format version 1): silent corruption cannot be detected; "
                "re-extract into a new file to get them"
            ],
            np.zeros(0, np.int64),
        )
    if not len(bad):
        return [], [], bad
    names = ", ".join(narration_id[r] for r in bad[:SHOW]) + (f" and {len(bad) - SHOW} more" if len(bad) > SHOW else "")
    return (
        [
            f"{len(bad)} segments' features do not match their checksums (corrupted on disk): {names}; "
            f"`ekx cache verify {path} --repair` marks them pending, then re-run the same extract command"
        ],
        [],
        bad,
    )


def mark_pending(path: Path, rows: np.ndarray) -> None:
    """Mark rows pending, so the extract command that made the cache redoes exactly those."""
    if not len(rows):
        return
    with h5py.File(path, "r+") as f:
        status = f["status"][...]
        status[rows] = store.PENDING
        f["status"][...] = status
