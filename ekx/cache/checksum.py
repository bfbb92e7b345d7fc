"""Per-row checksums: HDF5 stores none for our uncompressed chunks, so bit rot on a network
file system, an interrupted copy or a flipped block would go unseen. Each row's crc32 is
written with the row, before its status, and `ekx cache verify` recomputes it.

From format version 4 the checksum covers **every dataset the row owns**: its features
(float16 bytes as stored), its row number, and each dataset at the file's root but the
checksum and the status, by name - labels, ids, plan and frame indices, a dense store's
times, the failure reason, and any dataset added later, without a list to keep up. Data of
the whole file (``backbone_state/``) has its own crc32 (the ``file_checksum`` attribute).
Older caches still read, resume and verify under their own rule, with a warning naming what
it leaves unchecked: version 3 covers features, labels, ids and indices; version 2 the
features only; version 1 has no checksums at all.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ekx.cache import store

DATASET = "checksum"
SCAN_BYTES = 64 << 20  # one sequential read per 64 MiB: verify runs at disk speed
SHOW = 10  # narration ids named in a verify message


# the row format lives with the store (its writer seals each row); checksum.py scans files
from ekx.cache.store import EVERY_DATASET, WHOLE_ROW, RowMeta, row_crc, whole_row  # noqa: E402


def _chunk_offsets(dset: h5py.Dataset) -> np.ndarray | None:
    """File offset of each row's chunk (one row per chunk, unfiltered), or None."""
    n = dset.shape[0]
    if dset.chunks is None or dset.chunks[0] != 1 or dset.compression or n == 0:
        return None
    offsets = np.full(n, -1, np.int64)

    def note(info) -> None:
        offsets[info.chunk_offset[0]] = info.byte_offset

    dset.id.chunk_iter(note)
    return None if (offsets < 0).any() else offsets


def _row_blocks(path: Path, dset: h5py.Dataset):
    """(rows, [rows, V, K, D] float16) blocks covering every row: runs of chunks that lie back
    to back on disk are read with one raw read each (in file order, so the disk streams);
    h5py's chunk-by-chunk reads run ~4x slower, and are the fallback."""
    n = dset.shape[0]
    row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
    step = max(1, SCAN_BYTES // max(row_bytes, 1))
    offsets = _chunk_offsets(dset)
    if offsets is None:
        for lo in range(0, n, step):
            yield np.arange(lo, min(n, lo + step)), dset[lo : lo + step]
        return
    order = np.argsort(offsets, kind="stable")
    breaks = np.flatnonzero(np.diff(offsets[order]) != row_bytes) + 1
    with open(path, "rb", buffering=0) as fh:
        for run in np.split(order, breaks):
            for lo in range(0, len(run), step):
                rows = run[lo : lo + step]
                buf = np.empty((len(rows), *dset.shape[1:]), dset.dtype)
                fh.seek(int(offsets[rows[0]]))
                fh.readinto(memoryview(buf).cast("B"))  # type: ignore[arg-type]
                yield rows, buf


def corrupt_rows(path: Path) -> np.ndarray | None:
    """Rows marked done whose features no longer match their checksum; None if the cache has
    no checksums (format version 1)."""
    with h5py.File(path, "r") as f:
        if DATASET not in f:
            return None
        done = f["status"][...] == store.DONE
        want = f[DATASET][...]
        meta = RowMeta.read(f) if whole_row(f) else None
        bad: list[int] = []
        for rows, block in _row_blocks(path, f["features"]):
            for j in np.flatnonzero(done[rows]):
                if row_crc(block[j], int(rows[j]), meta) != want[rows[j]]:
                    bad.append(int(rows[j]))
    return np.array(sorted(bad), dtype=np.int64)


def unchecked(f: h5py.File) -> list[str]:
    """What the file's own checksum rule leaves out (an older format), named for the warning."""
    version = int(f.attrs.get("format_version", 0))
    if version >= EVERY_DATASET:
        return []
    covered = set(store.V3_COLUMNS) if version >= WHOLE_ROW else set()
    # a failed row's reason is text for the user: not worth a warning on every older cache
    rows = [k for k in store.row_datasets(f) if k not in covered and k != "failure"]
    groups = [f"{k}/" for k, v in f.items() if isinstance(v, h5py.Group)]
    return rows + groups


def file_changed(f: h5py.File) -> bool:
    """The data of the whole file (``backbone_state/``) no longer matches its checksum."""
    want = f.attrs.get(store.FILE_CHECKSUM)
    return want is not None and int(want) != store.file_crc(f)


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
    with h5py.File(path, "r") as f:
        version = int(f.attrs.get("format_version", 0))
        left_out = unchecked(f)
        problems = (
            [f"{path}: the file's own data ({', '.join(f'{k}/' for k, v in f.items() if isinstance(v, h5py.Group))}) "
             "changed on disk; re-extract into a new file"]
            if file_changed(f)
            else []
        )  # fmt: skip
    warnings = (
        [
            f"checksums of this cache (format version {version}) do not cover {', '.join(left_out)}: changes there "
            "go unseen; re-extract (or re-import) into a new file to get checksums of every dataset"
            + (" (version 2: they cover the features only)" if version < WHOLE_ROW else "")
        ]
        if left_out
        else []
    )
    if not len(bad):
        return problems, warnings, bad
    names = ", ".join(narration_id[r] for r in bad[:SHOW]) + (f" and {len(bad) - SHOW} more" if len(bad) > SHOW else "")
    problems.append(
        f"{len(bad)} segments do not match their checksums (features, labels, ids, indices or times changed on "
        f"disk): {names}; "
        f"`ekx cache verify {path} --repair` marks them pending, then re-run the same extract command"
    )
    return problems, warnings, bad


def mark_pending(path: Path, rows: np.ndarray) -> None:
    """Mark rows pending, so the extract command that made the cache redoes exactly those."""
    if not len(rows):
        return
    with h5py.File(path, "r+") as f:
        status = f["status"][...]
        status[rows] = store.PENDING
        f["status"][...] = status
