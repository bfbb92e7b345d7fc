"""What the per-row feature checksums cost (issue 17, point 4).

1. Stage 1: crc32 of one row's float16 features (done in the writer thread; zlib releases
   the GIL) against the time to extract that row. Extraction times per segment are the
   README's own figures: this CPU (ResNet-50, K=16: 13.1 useful frames/s -> 1.22 s) and the
   fastest full-scale projection (a prepared copy on a 16-core GPU node, 98.7 useful
   frames/s per core -> 1,579 frames/s -> 10.1 ms per K=16 segment). Target < 2%.
2. `ekx cache verify` on a synthetic cache of --gib GiB (ResNet-50 rows, 16 x 2048
   float16): the checksum pass and the whole verify, each from a cold page cache
   (posix_fadvise DONTNEED), against a raw sequential read of the same file. Target: the
   checksum pass bound by disk read.

    python bench/checksum_bench.py [--gib 4] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from ekx.cache import checksum, store, tools

EXTRACT_S = {"this CPU, resnet50 (1.22 s/segment)": 16 / 13.1, "GPU node, prepared copy (10.1 ms)": 16 / 1579}


def crc_cost() -> None:
    print("1. checksum of one row vs extracting it")
    for name, shape in {
        "resnet50 V=1": (1, 16, 2048),
        "resnet50 V=2": (2, 16, 2048),
        "r2plus1d_18": (1, 16, 512),
    }.items():
        rows = np.random.default_rng(0).normal(size=(256, *shape)).astype(np.float16)
        t0 = time.perf_counter()
        for _ in range(8):
            for r in rows:
                zlib.crc32(r.data)
        per = (time.perf_counter() - t0) / (8 * len(rows))
        ratios = ", ".join(f"{100 * per / s:.3f}% of {k}" for k, s in EXTRACT_S.items())
        print(f"   {name:14s} {rows[0].nbytes / 1024:5.0f} KiB/row  {per * 1e6:7.1f} us/row  = {ratios}")


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def make_big(path: Path, gib: float) -> None:
    shape = (1, 16, 2048)
    block = np.random.default_rng(1).normal(size=(512, *shape)).astype(np.float16)  # 32 MiB, repeated
    n = int(gib * 2**30 // block[0].nbytes) // len(block) * len(block)
    rows = store.Rows([f"P01_{i}" for i in range(n)], ["P01"] * n, np.zeros(n), np.zeros(n), np.arange(n))
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "views": 1,
        "frames_per_segment": 16,
        "feature_dim": 2048,
        "num_verbs": 97,
        "num_nouns": 300,
    }
    store.create(path, attrs, rows, *shape)
    import h5py

    with h5py.File(path, "r+") as f:
        for lo in range(0, n, len(block)):
            f["features"][lo : lo + len(block)] = block
    sums = np.array([zlib.crc32(r.data) for r in block], np.uint32)
    with h5py.File(path, "r+") as f:
        f[checksum.DATASET][...] = np.tile(sums, n // len(block))
        f["status"][...] = store.DONE


def timed(label: str, path: Path, fn, size: int) -> float:
    drop_cache(path)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"   {label:40s} {dt:7.2f} s  {size / dt / 2**30:6.2f} GiB/s")
    return dt


def raw_read(path: Path) -> None:
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def verify_speed(gib: float, where: Path) -> None:
    with tempfile.TemporaryDirectory(dir=where) as d:
        path = Path(d) / "big.h5"
        t0 = time.perf_counter()
        make_big(path, gib)
        size = path.stat().st_size
        print(f"2. verify on a {size / 2**30:.2f} GiB cache in {where} (made in {time.perf_counter() - t0:.0f} s)")
        raw = timed("raw sequential read (64 MiB reads)", path, lambda: raw_read(path), size)
        crc = timed("checksum pass (checksum.corrupt_rows)", path, lambda: checksum.corrupt_rows(path), size)
        raw2 = timed("raw sequential read again", path, lambda: raw_read(path), size)
        raw = min(raw, raw2)
        full = timed("whole `ekx cache verify` (tools.verify)", path, lambda: tools.verify(path), size)
        print(f"   checksum pass / raw read = {crc / raw:.2f}; whole verify / raw read = {full / raw:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    a = p.parse_args()
    crc_cost()
    verify_speed(a.gib, a.dir)
