"""Per-row feature checksums: silent corruption is found by narration id, repaired by
marking the rows pending, and re-extracted by the same command; merge carries them."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_cache
from typer.testing import CliRunner

from ekx import EkxError
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- whole-row checksums (format 3)


def _flip(path: Path, key: str, row: int) -> None:
    """Change one stored value of ``key`` behind the writer's back."""
    with h5py.File(path, "r+") as f:
        value = f[key][row]
        if key in ("narration_id", "video_id"):
            text = value.decode() if isinstance(value, bytes) else value
            f[key][row] = text[:-1] + chr(ord(text[-1]) ^ 1)  # one byte of the id
        else:
            f[key][row] = value ^ 1  # one bit (of every frame index for frame_index)


@pytest.mark.parametrize("key", ["verb_class", "noun_class", "narration_id", "video_id", "plan_index", "frame_index"])
def test_checksum_covers_labels_ids_and_indices(tmp_path, key):
    """(main: `cache verify` said ok after each of these; a flipped verb_class bit halved the
    verb top-1 that `ekx evaluate` then reported, exit 0.)"""
    path = make_cache(tmp_path / "c.h5", n=8)
    assert tools.verify(path) == ([], [])
    _flip(path, key, 3)
    problems, _ = tools.verify(path)
    names = open_cache(path).narration_id
    assert any("do not match their checksums" in p and names[3] in p for p in problems), problems
    assert checksum.corrupt_rows(path).tolist() == [3]


def test_rows_swapped_with_their_checksums_are_found(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=8)
    with h5py.File(path, "r+") as f:
        for key in ("features", "checksum"):
            a, b = f[key][3], f[key][4]
            f[key][3], f[key][4] = b, a
    assert checksum.corrupt_rows(path).tolist() == [3, 4]


def test_verify_with_the_annotation_file_compares_every_stored_label(tmp_path):
    """Labels rewritten *with* a fresh checksum (a buggy tool) still disagree with the CSV."""
    path = make_cache(tmp_path / "c.h5", n=6, num_verbs=5)
    c = open_cache(path)
    csv = tmp_path / "ann.csv"
    head = "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
    head += "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
    lines = [head]  # the official format, as the annotation loader reads it
    for i in range(6):
        vid, v, n = c.video_id[i], c.verb_class[i], c.noun_class[i]
        times = "00:00:01.00,00:00:01.00,00:00:02.00,60,120"
        lines.append(f"{c.narration_id[i]},{vid.split('_')[0]},{vid},{times},x,v{v},{v},n{n},{n},n{n},[{n}]")
    csv.write_text("\n".join(lines) + "\n")
    assert not [p for p in tools.verify(path, csv)[0] if "disagree" in p]
    with h5py.File(path, "r+") as f:
        f["verb_class"][2] = (f["verb_class"][2] + 1) % 5
        meta = checksum.RowMeta.read(f)
        f[checksum.DATASET][2] = checksum.row_crc(f["features"][2], 2, meta)
    assert tools.verify(path)[0] == []  # consistent checksum: only the annotation file can tell
    problems = tools.verify(path, csv)[0]
    assert any("1 rows disagree" in p and f"row 2 ({c.narration_id[2]})" in p for p in problems), problems


def test_version_2_cache_reads_resumes_and_verifies_with_a_warning(tmp_path):
    path = tmp_path / "v2.h5"
    make_cache(path, n=4)
    with h5py.File(path, "r+") as f:  # as ekx wrote them before: features-only checksums
        f.attrs["format_version"] = 2
        f[checksum.DATASET][...] = [checksum.row_crc(f["features"][i]) for i in range(4)]
    problems, warnings = tools.verify(path)
    assert problems == [] and any("cover the features only" in w for w in warnings), warnings
    w = store.Writer(path)  # resumes with its own kind of checksum
    w.write([(1, np.ones((1, 8, 32), np.float16), np.arange(8))], [])
    w.close()
    assert tools.verify(path)[0] == []
    _flip(path, "verb_class", 1)  # unchecked in version 2: the warning says so
    assert tools.verify(path)[0] == []


def test_merge_refuses_a_shard_row_that_fails_its_checksum(tmp_path):
    shard = make_cache(tmp_path / "s.h5", n=6)
    with h5py.File(shard, "r+") as f:
        f.attrs["shard"] = "0/1"
    _flip(shard, "noun_class", 2)
    with pytest.raises(EkxError, match=r"s.h5: 1 rows do not match their checksums.*--repair"):
        tools.merge(tmp_path / "m.h5", [shard])
    assert not (tmp_path / "m.h5").exists()


# ---------------------------------------------------------------- every dataset a row owns (format 4)

DENSE = {"dense": "4", "dense_span": "annotated", "dense_margin": 0.0}


@pytest.fixture(scope="module")
def dense_store(synth_data, tmp_path_factory) -> Path:
    """A dense store of random weights as `ekx extract --dense` writes it: every row done."""
    out = tmp_path_factory.mktemp("dense") / "dense.h5"
    cfg = ExtractConfig(**{**BASE, **DENSE, "limit": 3}, out=out)
    s = extract(cfg, synth_data / "annotations", synth_data / "videos", out.parent, warn=lambda m: None)
    assert (s.done, s.failed) == (3, 0), s.failures
    return out


def made(path: Path, kind: str) -> Path:
    """A small file of either kind through the writer's own path (`store.create`, `Writer`), with
    what extract adds to it: BatchNorm state (a 0-d counter too), a dense store's times."""
    k = 4
    path = make_cache(path, n=5, k=k)
    with h5py.File(path, "r") as f:
        attrs = store.read_attrs(f.attrs)
        feats = f["features"][...]
    c = open_cache(path)
    rows = store.Rows(c.narration_id, c.video_id, c.verb_class, c.noun_class, np.arange(5))
    state = {"bn.running_mean": np.linspace(0, 1, 8, dtype=np.float32), "bn.num_batches_tracked": np.array(7)}
    times = (np.arange(5 * k).reshape(5, k) + 0.5) / 4 if kind == "dense" else None
    if kind == "dense":
        attrs["kind"] = "dense"
    path.unlink()
    store.create(path, attrs, rows, 1, k, feats.shape[-1], state, times)
    w = store.Writer(path)
    w.write([(i, feats[i], np.arange(k)) for i in range(5)], [])
    w.close()
    return path


def every_dataset(path: Path) -> list[str]:
    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def flip_one_byte(path: Path, name: str) -> None:
    """XOR the first byte of the first value of a dataset (row 0 where it is a row's): behind
    the writer's back, as a flipped disk block would. The same flip again undoes it."""
    with h5py.File(path, "r+") as f:
        d = f[name]
        at = () if d.ndim == 0 else 0
        value = d[at]
        if d.dtype.kind == "O":  # a variable-length string: one byte of its text
            text = value.decode() if isinstance(value, bytes) else value
            d[at] = chr(ord(text[0]) ^ 1) + text[1:]
            return
        arr = np.array(value)
        arr.reshape(-1).view(np.uint8)[0] ^= 0xFF
        d[at] = arr


@pytest.mark.parametrize("kind", ["cache", "dense"])
def test_a_flipped_byte_in_any_dataset_fails_verify(tmp_path, kind):
    """Every dataset of the file, listed from the file itself (so one added later is checked
    too). (main: a flip in a dense store's time, a failure reason or backbone_state/ passed.)"""
    path = made(tmp_path / "c.h5", kind)
    names = every_dataset(path)
    assert {"features", "failure", "status", "checksum", "frame_index", "bn.running_mean"} <= {
        n.split("/")[-1] for n in names
    }
    assert ("time" in names) == (kind == "dense")
    assert tools.verify(path) == ([], [])
    passed = []
    for name in names:
        flip_one_byte(path, name)
        if not tools.verify(path)[0]:
            passed.append(name)
        flip_one_byte(path, name)
    assert passed == []
    assert tools.verify(path) == ([], [])


def test_the_made_store_holds_what_extract_writes(dense_store, tmp_path):
    """The files above hold every kind of dataset `ekx extract --dense` writes."""
    made_names = {n.split("/")[0] for n in every_dataset(made(tmp_path / "d.h5", "dense"))}
    assert {n.split("/")[0] for n in every_dataset(dense_store)} == made_names


def test_a_changed_dense_time_is_found_repaired_and_re_extracted(dense_store, synth_data, tmp_path):
    """(main: time[0, 2] 0.625 -> 7.0 passed `cache verify`, and the segments there then read
    features of another position.) Re-running the extract command restores the planned time."""
    path = tmp_path / "d.h5"
    shutil.copy(dense_store, path)
    with h5py.File(path, "r+") as f:
        assert f["time"][0, 2] == 0.625  # (2 + 0.5) / 4 s
        f["time"][0, 2] = 7.0
    names = open_cache(path).narration_id
    problems = tools.verify(path)[0]
    assert any("do not match their checksums" in p and names[0] in p for p in problems), problems
    result = runner.invoke(app, ["cache", "verify", str(path), "--repair"], terminal_width=300)
    assert result.exit_code == 1 and "pending" in result.output, result.output
    cfg = ExtractConfig(**{**BASE, **DENSE, "limit": 3}, out=path)
    s = extract(cfg, synth_data / "annotations", synth_data / "videos", tmp_path, warn=lambda m: None)
    assert (s.processed, s.done) == (1, 3)
    assert open_cache(path).time[0, 2] == 0.625 and tools.verify(path) == ([], [])


def test_a_done_row_whose_planned_value_changed_is_refused_on_resume(dense_store, tmp_path):
    """What `restore_plan` heals is a row to be redone; a done one is left to `verify --repair`."""
    path = tmp_path / "d.h5"
    shutil.copy(dense_store, path)
    c = open_cache(path)
    rows = store.Rows(c.narration_id, c.video_id, c.verb_class, c.noun_class, np.arange(len(c.status)))
    with h5py.File(path, "r+") as f:
        f["time"][1, 0] = 99.0
    with pytest.raises(EkxError, match=r"row 1 \(.*@1\) holds another time than this run plans.*--repair"):
        store.Writer(path).restore_plan(rows, c.time)
    checksum.mark_pending(path, np.array([1]))
    w = store.Writer(path)
    w.restore_plan(rows, c.time)
    w.close()
    assert open_cache(path).time[1, 0] == c.time[1, 0]


def test_a_version_3_store_verifies_and_names_what_its_checksums_leave_out(dense_store, tmp_path):
    path = tmp_path / "v3.h5"
    shutil.copy(dense_store, path)
    with h5py.File(path, "r+") as f:  # as ekx sealed rows before: features, labels, ids, indices
        f.attrs["format_version"] = 3
        del f.attrs[store.FILE_CHECKSUM]
        meta = checksum.RowMeta.read(f)
        f[checksum.DATASET][...] = [checksum.row_crc(f["features"][r], r, meta) for r in range(len(f["status"]))]
    problems, warnings = tools.verify(path)
    assert problems == [] and any("do not cover time, backbone_state/" in w for w in warnings), warnings
    w = store.Writer(path)  # resumes under its own rule
    w.write([(1, np.ones((1, 4, 2048), np.float16), np.arange(4))], [])
    w.close()
    assert tools.verify(path)[0] == []
    _flip(path, "verb_class", 1)  # covered by version 3
    assert checksum.corrupt_rows(path).tolist() == [1]


# ---------------------------------------------------------------- features that are not numbers


def test_nan_weights_fail_every_segment_by_name(synth_data, tmp_path):
    """(main: NaN weights wrote NaN features, "0 failed", exit 0.)"""
    import torch

    from ekx.extract import backbones

    state = backbones.get("resnet50").build().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")  # channel 0 spreads through every later layer
    weights = tmp_path / "nan.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, weights)
    ann, videos = synth_data / "annotations", synth_data / "videos"
    args = ["extract", "--split", "validation", "--weights", str(weights), "--frames", "2", "--limit", "2"]
    args += ["--workers", "0", "--annotations", str(ann), "--videos", str(videos), "--out", str(tmp_path / "n.h5")]
    r = runner.invoke(app, args, terminal_width=300)
    assert r.exit_code == 1 and "2 segments failed" in r.output, r.output
    c = open_cache(tmp_path / "n.h5")
    assert c.counts() == {"pending": 0, "done": 0, "failed": 2}
    for nid in c.narration_id:
        assert f"failed {nid}: features not finite" in r.output


def test_one_segment_with_non_finite_features_fails_alone(synth_data, tmp_path, monkeypatch):
    """One isfinite over the batch, but the verdict per segment: the others of the same batch
    are written."""
    import torch

    from ekx.extract import pipeline

    real = pipeline.segment_inputs
    bad = {}

    def inputs(res, nid, *a, **k):
        x = real(res, nid, *a, **k)
        bad.setdefault("nid", nid)  # the first segment decoded
        return torch.full_like(x, float("inf")) if nid == bad["nid"] else x

    monkeypatch.setattr(pipeline, "segment_inputs", inputs)
    cfg = ExtractConfig(**{**BASE, "frames": 2, "limit": 3, "workers": 0}, out=tmp_path / "f.h5")
    summary = extract(cfg, synth_data / "annotations", synth_data / "videos", tmp_path, warn=lambda m: None)
    assert (summary.done, summary.failed) == (2, 1)
    assert summary.failures == [(bad["nid"], pipeline.NOT_FINITE)]
    assert tools.verify(tmp_path / "f.h5")[0] == []  # the done rows hold finite features
