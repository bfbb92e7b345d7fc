"""The HDF5 feature cache: the contract between stage 1 and stage 2.

One file per backbone and split. Root attributes say how it was made; datasets hold
one row per planned segment:

    features      [N, V, K, D] float16, one segment per chunk, uncompressed
    narration_id  [N] str            video_id [N] str
    verb_class    [N] int32 (-1: unlabelled)   noun_class [N] int32
    frame_index   [N, K] int64       (centre frame of each sample, in the video's own fps)
    plan_index    [N] int64          (row in the unsharded plan; merge orders by it)
    checksum      [N] uint32         crc32 of everything stored for the row: from version 4
                                     every dataset at the file's root but the checksum and
                                     the status (version 3: features, labels, ids and
                                     indices; version 2: features only), written before the
                                     status; see checksum.py
    status        [N] uint8          0 pending, 1 done, 2 failed
    time          [N, K] float64     (dense stores only, see dense.py) each position's
                                     time in seconds, NaN past the video's end
    failure       [N] bytes(240)     the reason, for failed rows
    backbone_state/<key>             (--weights none only) the BatchNorm statistics the
                                     random backbone was calibrated with: with the seed,
                                     they rebuild the exact extractor for `ekx predict`

Every dataset at the root holds one entry per row (a row owns it: the row checksum covers
it, whatever its name); data of the whole file lives in groups (``backbone_state/``), covered
by the ``file_checksum`` attribute written at creation.

Crash safety (SIGKILL included): every dataset is created with its full size and all
its chunks allocated up front, so later writes touch raw data only, never HDF5
metadata; a row's features are flushed before its status says done. A killed run
leaves a file that opens, with rows either done (and complete) or pending.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ekx import EkxError

FORMAT = "ekx-features"
VERSION = 4  # 2: per-row feature checksums; 3: + labels, ids, indices; 4: every dataset a row owns
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
REASON_BYTES = 240


@dataclass
class Rows:
    """The planned segments of a cache, in row order."""

    narration_id: list[str]
    video_id: list[str]
    verb_class: np.ndarray
    noun_class: np.ndarray
    plan_index: np.ndarray


def _early_dcpl(chunks: tuple[int, ...]) -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(chunks)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # no metadata writes after creation
    return dcpl


def _attr(value: Any) -> Any:
    if isinstance(value, str):
        return str(value)  # torch.__version__ is a str subclass h5py cannot store
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return np.array(value, dtype=h5py.string_dtype())
    return list(value) if isinstance(value, tuple) else value


def create(
    path: Path,
    attrs: dict,
    rows: Rows,
    views: int,
    k: int,
    dim: int,
    backbone_state: dict[str, np.ndarray] | None = None,
    times: np.ndarray | None = None,
) -> None:
    """Write a new cache with every row pending; atomic (a temp file renamed into place).
    ``times`` [N, K]: a dense store's position times (`ekx.cache.dense`), known at planning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    n = len(rows.narration_id)
    check_space(path, n * views * k * dim * 2 + n * (8 * k + REASON_BYTES + 64))
    try:
        _write_new(tmp, attrs, rows, views, k, dim, backbone_state, times)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a half-made file behind
        if isinstance(e, OSError) and (e.errno == 28 or "No space" in str(e)):
            raise EkxError(f"{path}: disk full while creating the cache; free some space and re-run") from None
        raise
    os.replace(tmp, path)


# headroom beyond the raw arrays: HDF5 metadata, attributes, BatchNorm state
SPACE_MARGIN = 16 * 2**20


def check_space(path: Path, nbytes: int) -> None:
    """Stop before creating a cache the disk cannot hold: every chunk is allocated at
    creation, and HDF5 failing mid-way crashes hard (even segfaults) instead of saying so."""
    need = nbytes + SPACE_MARGIN
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise EkxError(
            f"{path}: a new cache needs {need / 2**20:,.1f} MiB, {path.parent} has {free / 2**20:,.1f} MiB "
            "free; free some space or put the cache elsewhere (--out / --features)"
        )


def _write_new(
    tmp: Path,
    attrs: dict,
    rows: Rows,
    views: int,
    k: int,
    dim: int,
    backbone_state: dict[str, np.ndarray] | None,
    times: np.ndarray | None = None,
) -> None:
    n = len(rows.narration_id)
    with h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        str_t = h5py.string_dtype()
        f.create_dataset("narration_id", data=np.array(rows.narration_id, dtype=object), dtype=str_t)
        f.create_dataset("video_id", data=np.array(rows.video_id, dtype=object), dtype=str_t)
        f.create_dataset("verb_class", data=rows.verb_class.astype(np.int32))
        f.create_dataset("noun_class", data=rows.noun_class.astype(np.int32))
        f.create_dataset("plan_index", data=rows.plan_index.astype(np.int64))
        m = max(n, 1)
        f.create_dataset("features", (n, views, k, dim), np.float16, dcpl=_early_dcpl((1, views, k, dim)))
        f.create_dataset("frame_index", (n, k), np.int64, dcpl=_early_dcpl((min(m, 4096), k)))
        f.create_dataset("checksum", (n,), np.uint32, dcpl=_early_dcpl((min(m, 65536),)))
        f.create_dataset("status", (n,), np.uint8, dcpl=_early_dcpl((min(m, 65536),)))
        f.create_dataset("failure", (n,), f"S{REASON_BYTES}", dcpl=_early_dcpl((min(m, 4096),)))
        f["status"][...] = PENDING
        if times is not None:
            f.create_dataset("time", data=np.asarray(times, np.float64).reshape(n, k))
        if backbone_state:
            group = f.create_group("backbone_state")
            for key, value in backbone_state.items():
                group.create_dataset(key, data=np.asarray(value))
        f.attrs[FILE_CHECKSUM] = file_crc(f)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (annotation files, weights): torch-free, for `ekx import` too."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_backbone_state(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        group = f.get("backbone_state")
        return {k: group[k][()] for k in group} if group is not None else {}


def check_rows(path: Path, f: h5py.File, rows: Rows) -> None:
    have = [s.decode() if isinstance(s, bytes) else s for s in f["narration_id"][...]]
    if have != rows.narration_id:
        raise EkxError(
            f"{path}: holds a different list of segments ({len(have)} rows) than this run "
            f"plans ({len(rows.narration_id)}): another annotation file, --limit or --shard. "
            "Delete the file or write to another --out"
        )


class Writer:
    """Appends results to an open cache. Not thread-safe: one writer thread owns it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # no chunk cache: a segment's chunk goes straight to the file on write
            self.f = h5py.File(path, "r+", rdcc_nbytes=0)
        except OSError as e:
            raise EkxError(f"{path}: cannot open for writing ({e}); is another ekx writing it?") from None
        self.features = self.f["features"]
        self.frame_index = self.f["frame_index"]
        self.status = self.f["status"]
        self.failure = self.f["failure"]
        self.checksum = self.f.get("checksum")  # None in a version-1 cache: resumes without them
        # an older cache resumes with its own kind of checksum (version 2: features only)
        self.meta = RowMeta.read(self.f) if whole_row(self.f) else None

    def status_array(self) -> np.ndarray:
        return self.status[...]

    def restore_plan(self, rows: Rows, times: np.ndarray | None = None) -> None:
        """A resumed run's planned values (ids, labels, plan rows, a dense store's times) against
        the file's: a row to be redone whose values changed on disk (found and marked pending by
        `ekx cache verify --repair`) gets the plan's back, so re-extracting it heals it instead
        of sealing the changed value; a done row whose values differ is refused."""
        planned = {
            "video_id": np.array(rows.video_id, dtype=object),
            "verb_class": rows.verb_class.astype(np.int32),
            "noun_class": rows.noun_class.astype(np.int32),
            "plan_index": rows.plan_index.astype(np.int64),
            "time": None if times is None else np.asarray(times, np.float64),
        }
        done = self.status[...] == DONE
        for name, want in planned.items():
            if want is None or name not in self.f:
                continue
            have = self.f[name][...]
            if have.dtype.kind == "O":
                have = np.array(decode_strings(have), dtype=object)
            if have.shape != want.shape:
                self.close()
                raise EkxError(f"{self.path}: its {name} has shape {have.shape}, this run plans {want.shape}")
            same = have == want if want.dtype.kind == "O" else (have == want) | (np.isnan(have) & np.isnan(want))
            differs = np.flatnonzero(~same.reshape(len(want), -1).all(axis=1))
            if done[differs].any():
                r = int(differs[done[differs]][0])
                nid = decode_strings([self.f["narration_id"][r]])[0]
                self.close()  # the caller never gets this writer
                raise EkxError(
                    f"{self.path}: row {r} ({nid}) holds another {name} than this run plans; "
                    f"run `ekx cache verify {self.path} --repair`, then this command again"
                )
            for row in differs.tolist():
                self.f[name][row] = want[row]
                if self.meta is not None:
                    self.meta.set(name, row, want[row])

    def write(self, done: list[tuple[int, np.ndarray, np.ndarray]], failed: list[tuple[int, str]]) -> None:
        """Write features of done rows, flush, then mark them done (order matters for crashes)."""
        for row, feats, index in done:
            feats = np.ascontiguousarray(feats, dtype=np.float16)  # the checksum covers the stored bytes
            self.features[row] = feats
            self.frame_index[row] = index
            if self.meta is not None:
                self.meta.set("frame_index", row, index)
                if self.meta.stale_reason(row):  # a row that failed before: its old reason goes
                    self.failure[row] = b""
                    self.meta.set("failure", row, b"")
            if self.checksum is not None:
                self.checksum[row] = row_crc(feats, row, self.meta)
        for row, reason in failed:
            self.failure[row] = reason.encode("utf-8", "replace")[:REASON_BYTES]
        self.f.flush()
        for row, _, _ in done:
            self.status[row] = DONE
        for row, _ in failed:
            self.status[row] = FAILED
        self.f.flush()

    def write_block(self, start: int, feats: np.ndarray, index: np.ndarray) -> None:
        """Rows start .. start + n, all done, in one bulk write per dataset (`ekx import`, which
        owns its new file): features and checksums, flush, then the status, as `write`."""
        n = len(feats)
        feats = np.ascontiguousarray(feats, dtype=np.float16)
        self.features[start : start + n] = feats
        self.frame_index[start : start + n] = index
        if self.meta is not None:
            self.meta.set("frame_index", slice(start, start + n), index)
        if self.checksum is not None:
            self.checksum[start : start + n] = [row_crc(feats[i], start + i, self.meta) for i in range(n)]
        self.f.flush()
        self.status[start : start + n] = DONE
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def read_attrs(attrs) -> dict:
    out = {}
    for k, v in attrs.items():
        v = v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v
        if isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[k] = v
    return out


def open_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return read_attrs(f.attrs)


def decode_strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# ---------------------------------------------------------------- the row checksum (see checksum.py)

WHOLE_ROW = 3  # the format version from which a checksum covers more than the features
EVERY_DATASET = 4  # ... and from which it covers every dataset the row owns, by name
FEATURES = "features"
# the row's ledger: the checksum itself, and the status written after it (verify reads it)
LEDGER = frozenset({"checksum", "status"})
V3_COLUMNS = ("narration_id", "video_id", "verb_class", "noun_class", "plan_index", "frame_index")
FILE_CHECKSUM = "file_checksum"  # attribute: crc32 of every dataset in a group (data of the whole file)


def row_datasets(f: h5py.File) -> list[str]:
    """What a row owns besides its features (format 4): every dataset at the root but the
    ledger - a dataset added later (a dense store's time, anything new) is covered unnamed."""
    return sorted(k for k, d in f.items() if isinstance(d, h5py.Dataset) and k not in LEDGER and k != FEATURES)


def _column(dset: h5py.Dataset) -> Any:
    values = dset[...]
    return decode_strings(values) if values.dtype.kind == "O" else values  # variable-length strings


@dataclass
class RowMeta:
    """What a cache stores for each row besides its features, by dataset (bulk-read once), and
    the format version whose rule seals a row."""

    columns: dict[str, Any]  # name -> [N, ...] array, or list of str
    version: int = VERSION

    @classmethod
    def read(cls, f: h5py.File) -> RowMeta:
        version = int(f.attrs.get("format_version", 0))
        names = row_datasets(f) if version >= EVERY_DATASET else V3_COLUMNS
        return cls({name: _column(f[name]) for name in names}, version)

    def set(self, name: str, rows, values) -> None:
        """Keep a value the writer stores in step (only datasets this version's rule covers)."""
        if name in self.columns:
            self.columns[name][rows] = values

    def stale_reason(self, row: int) -> bool:
        col = self.columns.get("failure")
        return col is not None and bool(col[row])


def _row_bytes(col: Any, i: int) -> bytes:
    return col[i].encode() if isinstance(col, list) else col[i : i + 1].tobytes()


def row_crc(feats: np.ndarray, row: int | None = None, meta: RowMeta | None = None, src: int | None = None) -> int:
    """crc32 of one row as stored: its float16 features and, with ``meta``, its row number and
    what else it owns (format 4: every dataset in ``meta``, each after its name; format 3:
    labels, plan index, frame indices and ids). ``src``: the row's index in ``meta`` when
    that differs from ``row`` (a merge writes row ``row`` from another file)."""
    crc = zlib.crc32(np.ascontiguousarray(feats, dtype=np.float16).data)
    if meta is None or row is None:
        return crc
    i = row if src is None else src
    c = meta.columns
    if meta.version < EVERY_DATASET:  # format 3's rule, as its files were sealed
        numbers = np.array([row, c["verb_class"][i], c["noun_class"][i], c["plan_index"][i]], np.int64)
        crc = zlib.crc32(numbers.tobytes(), crc)
        crc = zlib.crc32(np.ascontiguousarray(c["frame_index"][i], np.int64).tobytes(), crc)
        return zlib.crc32(f"{c['narration_id'][i]}\0{c['video_id'][i]}".encode(), crc)
    crc = zlib.crc32(np.int64(row).tobytes(), crc)
    for name, col in c.items():
        crc = zlib.crc32(_row_bytes(col, i), zlib.crc32(name.encode() + b"\0", crc))
    return crc


def file_crc(f: h5py.File) -> int:
    """crc32 of every dataset inside a group (``backbone_state/``...), by path: what the file
    holds once, not per row."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and "/" in name else None)
    crc = 0
    for name in sorted(names):
        value = np.asarray(f[name][()])
        data = "\0".join(decode_strings(value.reshape(-1))).encode() if value.dtype.kind == "O" else value.tobytes()
        crc = zlib.crc32(data, zlib.crc32(name.encode() + b"\0", crc))
    return crc


def whole_row(f: h5py.File) -> bool:
    return int(f.attrs.get("format_version", 0)) >= WHOLE_ROW
