"""Per-row feature checksums: silent corruption is found by narration id, repaired by
marking the rows pending, and re-extracted by the same command; merge carries them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from conftest import make_cache
from typer.testing import CliRunner

from ekx.cache import checksum, store, tools
from ekx.cache.reader import _contiguous_offset, open_cache
from ekx.cli import app
from ekx.extract.pipeline import ExtractConfig, extract

runner = CliRunner()
BASE = {"split": "validation", "weights": "none", "frames": 4, "batch_size": 4, "workers": 1}


def run(data: Path, out: Path):
    cfg = ExtractConfig(**BASE, out=out)
    return extract(cfg, data / "annotations", data / "videos", out.parent, warn=lambda m: None)


def flip_bytes(path: Path, row: int) -> None:
    """Change a few bytes in the middle of one row's features, behind HDF5's back."""
    with h5py.File(path, "r") as f:
        dset = f["features"]
        offset = _contiguous_offset(dset)
        row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
    assert offset is not None
    with open(path, "r+b") as fh:
        fh.seek(offset + row * row_bytes + row_bytes // 2)
        old = fh.read(4)
        fh.seek(-4, 1)
        fh.write(bytes(b ^ 0x5A for b in old))


def test_corrupt_row_is_named_repaired_and_reextracted(synth_data, tmp_path):
    out = tmp_path / "f.h5"
    assert run(synth_data, out).done == 6
    before = open_cache(out).features()
    assert tools.verify(out)[0] == []
    flip_bytes(out, 3)
    names = open_cache(out).narration_id
    problems, _ = tools.verify(out)
    bad = [p for p in problems if "checksum" in p]
    assert len(bad) == 1 and names[3] in bad[0], problems
    assert not any(names[i] in bad[0] for i in range(6) if i != 3)
    result = runner.invoke(app, ["cache", "verify", str(out), "--repair"], terminal_width=300)
    assert result.exit_code == 1 and "pending" in result.output, result.output
    assert (open_cache(out).status == store.DONE).tolist() == [i != 3 for i in range(6)]
    summary = run(synth_data, out)  # the same extract command redoes exactly that row
    assert summary.processed == 1 and summary.done == 6
    result = runner.invoke(app, ["cache", "verify", str(out)], terminal_width=300)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_cache(out).features(), before)


def test_version_1_cache_reads_and_verify_says_it_cannot_check(tmp_path):
    path = make_cache(tmp_path / "old.h5", n=8)
    with h5py.File(path, "r+") as f:
        del f[checksum.DATASET]
        f.attrs["format_version"] = 1
    assert open_cache(path).done.all()
    problems, warnings = tools.verify(path)
    assert problems == [] and any("no feature checksums" in w for w in warnings), warnings
    w = store.Writer(path)  # a version-1 cache still resumes (without checksums)
    w.write([(0, np.zeros((1, 8, 32), np.float16), np.arange(8))], [])
    w.close()


def test_merge_carries_checksums(tmp_path):
    shard = make_cache(tmp_path / "s.h5", n=12)
    with h5py.File(shard, "r+") as f:  # a whole plan as one shard (merge refuses a partial set)
        f.attrs["shard"] = "0/1"
    merged = tmp_path / "m.h5"
    tools.merge(merged, [shard])
    with h5py.File(shard, "r") as a, h5py.File(merged, "r") as b:
        assert b[checksum.DATASET][...].any()
        np.testing.assert_array_equal(a[checksum.DATASET][...], b[checksum.DATASET][...])
    assert tools.verify(merged)[0] == []
    with h5py.File(merged, "r+") as f:  # a changed value that bypasses the writer
        f["features"][5, 0, 0, 0] += 1
    assert checksum.corrupt_rows(merged).tolist() == [5]
