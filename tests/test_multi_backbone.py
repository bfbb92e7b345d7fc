"""`ekx extract --backbone a,b,c`: one decode, one cache per backbone, each equal (within the
stated tolerance) to a single-backbone run, each resumable on its own (also after kill -9),
sharded and with augmented views."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cache import store, tools
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.extract.pipeline import ExtractConfig, extract, extract_many
from ekx.extract.targets import select_frames
from ekx.extract.video import clip_times, frame_at

ALL = "resnet50,efficientnet_b3,r2plus1d_18"
runner = CliRunner()


def cfg(**kw) -> ExtractConfig:
    base = {"split": "validation", "weights": "none", "frames": 2, "batch_size": 4, "workers": 1}
    return ExtractConfig(**{**base, **kw})


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_select_frames_takes_each_backbones_own_frames():
    t, times = np.array([0.01, 0.35, 0.99]), np.arange(30) / 30  # centre times; a 30 fps second

    def frames_of(clip_len: int) -> np.ndarray:
        return frame_at(times, clip_times(t, clip_len))

    eight = frames_of(8)  # what the union decode returns for an 8-frame backbone
    frames = eight[:, None, None, None].repeat(2, axis=1)  # a fake "image" carrying its index
    assert (select_frames(frames, 3, 8, 1)[:, 0, 0, 0] == frames_of(1)).all()
    assert (select_frames(frames, 3, 8, 4)[:, 0, 0, 0] == frames_of(4)).all()
    assert (select_frames(frames, 3, 8, 8)[:, 0, 0, 0] == eight).all()


@pytest.fixture(scope="module")
def singles(synth_data, tmp_path_factory) -> dict[str, Path]:
    """Each backbone extracted on its own (the reference)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name in ALL.split(","):
        s = extract(cfg(backbone=name), synth_data / "annotations", synth_data / "videos", root, warn=lambda m: None)
        assert s.done == 6
        out[name] = s.path
    return out


@pytest.mark.slow
def test_one_pass_caches_verify_and_match_single_backbone_runs(synth_data, singles, tmp_path):
    result = runner.invoke(
        app,
        [
            "extract",
            "--backbone",
            ALL,
            "--split",
            "validation",
            "--weights",
            "none",
            "--frames",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--annotations",
            str(synth_data / "annotations"),
            "--videos",
            str(synth_data / "videos"),
            "--features",
            str(tmp_path),
        ],
        terminal_width=300,
    )
    assert result.exit_code == 0, result.output
    for name, ref in singles.items():
        path = tmp_path / name / "validation.h5"
        assert f"{path}: 6/6 segments done" in " ".join(result.output.split())
        problems, _ = tools.verify(path)
        assert not problems, problems
        mine, theirs = open_cache(path), open_cache(ref)
        assert mine.narration_id == theirs.narration_id
        np.testing.assert_array_equal(mine.frame_index, theirs.frame_index)  # the same sampled frames
        assert mine.attrs["backbone"] == name and mine.attrs["feature_dim"] == theirs.attrs["feature_dim"]
        assert mine.attrs["bn_calibration"] == theirs.attrs["bn_calibration"]
        c = cosine(mine.features(), theirs.features())
        # the union decode is at EfficientNet-B3's size (the largest), so its input is the very
        # same; ResNet-50 and R(2+1)D get frames decoded at 320 px and resized by torchvision
        # instead of scaled to their own size by the decoder - measured here 0.981 / 0.984 at
        # worst with random weights, which magnify pixel noise (README: "Several backbones")
        floor = {"resnet50": 0.975, "efficientnet_b3": 0.9999, "r2plus1d_18": 0.975}[name]
        assert c.min() >= floor, (name, c.min(), c.mean())


@pytest.mark.slow
def test_each_cache_resumes_on_its_own(synth_data, singles, tmp_path):
    ann, videos = synth_data / "annotations", synth_data / "videos"
    # resnet50's cache already complete (from a pass with efficientnet_b3: decoded at b3's size),
    # efficientnet_b3's half done: only what each lacks is computed
    extract_many(cfg(backbone="resnet50,efficientnet_b3"), ann, videos, tmp_path / "full", warn=lambda m: None)
    (tmp_path / "resnet50").mkdir()
    shutil.copy(tmp_path / "full" / "resnet50" / "validation.h5", tmp_path / "resnet50" / "validation.h5")
    extract(cfg(backbone="efficientnet_b3", limit=3), ann, videos, tmp_path / "half", warn=lambda m: None)
    half = tmp_path / "half" / "efficientnet_b3" / "validation.h5"
    with h5py.File(half, "r") as f:
        feats, status = f["features"][:3], f["status"][:3]
    (tmp_path / "efficientnet_b3").mkdir()
    store.create(
        tmp_path / "efficientnet_b3" / "validation.h5",
        {**store.open_attrs(singles["efficientnet_b3"])},
        store.Rows(
            open_cache(singles["efficientnet_b3"]).narration_id,
            open_cache(singles["efficientnet_b3"]).video_id,
            open_cache(singles["efficientnet_b3"]).verb_class,
            open_cache(singles["efficientnet_b3"]).noun_class,
            np.arange(6),
        ),
        1,
        2,
        1536,
    )
    w = store.Writer(tmp_path / "efficientnet_b3" / "validation.h5")
    w.write([(i, feats[i], open_cache(half).frame_index[i]) for i in range(3) if status[i] == store.DONE], [])
    w.close()
    summaries = extract_many(cfg(backbone="resnet50,efficientnet_b3"), ann, videos, tmp_path, warn=lambda m: None)
    assert [s.processed for s in summaries] == [0, 3]
    assert all(s.done == 6 for s in summaries)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_same_caches(synth_data, tmp_path):
    ann, videos = synth_data / "annotations", synth_data / "videos"
    names = "resnet50,r2plus1d_18"
    ref_root = tmp_path / "ref"
    extract_many(cfg(backbone=names, workers=0, batch_size=1), ann, videos, ref_root, warn=lambda m: None)
    root = tmp_path / "killed"
    argv = [
        "extract",
        "--backbone",
        names,
        "--split",
        "validation",
        "--weights",
        "none",
        "--frames",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--annotations",
        str(ann),
        "--videos",
        str(videos),
        "--features",
        str(root),
    ]
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ekx", *argv], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    target = root / "resnet50" / "validation.h5"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            with h5py.File(target, "r") as f:
                if int((f["status"][...] == store.DONE).sum()) >= 2:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [open_cache(root / n / "validation.h5").counts()["done"] for n in names.split(",")]
    assert min(done) < 6, (done, log.read_text())
    assert runner.invoke(app, argv).exit_code == 0
    for name in names.split(","):
        a, b = open_cache(root / name / "validation.h5"), open_cache(ref_root / name / "validation.h5")
        assert a.counts()["done"] == 6
        np.testing.assert_array_equal(a.features(), b.features())


@pytest.mark.slow
def test_run_stopped_between_two_rows_then_resumed_is_bit_identical(synth_data, tmp_path, monkeypatch):
    """A run stopped after efficientnet_b3's first row reached its writer but before its second
    (as a kill -9 lands between two of the writer's batches), then resumed: both caches equal an
    uninterrupted run's bit for bit. The resumed run groups other segments into its batches, and
    efficientnet_b3's CPU kernels (its squeeze-excitation 1x1 convolutions) give a row other low
    bits in another batch size or position in the batch (measured: up to 3e-6 in float32, so some
    float16 values round the other way) - so each segment now runs in forward passes of its own."""
    from ekx.extract import writer

    ann, videos = synth_data / "annotations", synth_data / "videos"
    names = "resnet50,efficientnet_b3"
    c = cfg(backbone=names, workers=0)  # 2 frames a segment, batches of 4 inputs: two segments a batch
    extract_many(c, ann, videos, tmp_path / "ref", warn=lambda m: None)
    real_put, rows_put = writer.WriterThread.put, []

    def put(self, item):
        if item[0] == "done" and self.writer.path.parent.name == "efficientnet_b3":
            rows_put.append(item[1])
            if len(rows_put) == 2:
                raise KeyboardInterrupt  # Ctrl-C: the run stops, its writers flush what they got
        real_put(self, item)

    monkeypatch.setattr(writer.WriterThread, "put", put)
    with pytest.raises(KeyboardInterrupt):
        extract_many(c, ann, videos, tmp_path / "run", warn=lambda m: None)
    monkeypatch.undo()
    done = {n: open_cache(tmp_path / "run" / n / "validation.h5").counts()["done"] for n in names.split(",")}
    assert done == {"resnet50": 2, "efficientnet_b3": 1}  # an odd row count: the resumed batches differ
    summaries = extract_many(c, ann, videos, tmp_path / "run", warn=lambda m: None)
    assert [s.processed for s in summaries] == [4, 5]
    for name in names.split(","):
        a = open_cache(tmp_path / "run" / name / "validation.h5")
        b = open_cache(tmp_path / "ref" / name / "validation.h5")
        assert a.counts()["done"] == 6
        np.testing.assert_array_equal(a.frame_index, b.frame_index)
        np.testing.assert_array_equal(a.features(), b.features(), err_msg=name)


@pytest.mark.slow
def test_shards_and_views_with_several_backbones(synth_data, tmp_path):
    ann, videos = synth_data / "annotations", synth_data / "videos"
    names = "resnet50,efficientnet_b3"
    for i in range(2):
        extract_many(
            cfg(backbone=names, split="train", shard=(i, 2), limit=8, views=2), ann, videos, tmp_path, warn=print
        )
    whole = tmp_path / "whole"
    extract_many(cfg(backbone=names, split="train", limit=8, views=2), ann, videos, whole, warn=lambda m: None)
    for name in names.split(","):
        merged = tmp_path / name / "train.h5"
        tools.merge(merged, sorted((tmp_path / name).glob("train.shard*of2.h5")))
        a, b = open_cache(merged), open_cache(whole / name / "train.h5")
        assert a.features().shape[1] == 2  # two views
        np.testing.assert_array_equal(a.features(), b.features())


def test_several_backbones_refuse_one_out_file_and_unknown_names(synth_data, tmp_path):
    ann, videos = synth_data / "annotations", synth_data / "videos"
    with pytest.raises(EkxError, match="--out names one cache file"):
        extract_many(cfg(backbone="resnet50,r2plus1d_18", out=tmp_path / "x.h5"), ann, videos, tmp_path)
    with pytest.raises(EkxError, match="each once"):
        extract_many(cfg(backbone="resnet50,resnet50"), ann, videos, tmp_path)
    with pytest.raises(EkxError, match="unknown backbone"):
        extract_many(cfg(backbone="resnet50,vgg16"), ann, videos, tmp_path)
