"""Audio in stage 1 (issue 33): features of the videos' own sound track as per-segment caches
and dense stores - a random `audio:auditory_slowfast` and a tiny local `hf:` sound model -
with the cache contract of frames (identity, verify, kill -9 and resume bit-identical, shards
and merge); the time of a feature is the centre of its window (a tone that starts at t is
found at t); videos without sound are refused in one line, tracks shorter than the video
fail the segments they do not cover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_audio_reference import save_tiny_audio
from typer.testing import CliRunner

from ekx import EkxError, epic, synth
from ekx.cache import store, tools
from ekx.cache.reader import failures, open_cache
from ekx.cli import app
from ekx.extract.pipeline import ExtractConfig, extract

ASF = "audio:auditory_slowfast"
runner = CliRunner()


def cfg(**kw) -> ExtractConfig:
    base = dict(split="validation", frames=2, workers=0, device="cpu", precision="fp32", calibration_segments=2)
    return ExtractConfig(**{**base, **kw})


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def wav2vec(tmp_path_factory) -> str:
    return "hf:" + str(save_tiny_audio("wav2vec2", tmp_path_factory.mktemp("w2v") / "tiny-wav2vec2"))


@pytest.fixture(scope="module")
def asf_cache(synth_data, tmp_path_factory) -> Path:
    """Random Auditory SlowFast over 3 segments of the validation video, one window each
    (the network is the real one: ~0.2 s a window on two cores), BatchNorm calibrated on one."""
    out = tmp_path_factory.mktemp("asf") / "validation.h5"
    c = cfg(backbone=ASF, weights="none", out=out, frames=1, limit=3, calibration_segments=1)
    s = extract(c, synth_data / "annotations", synth_data / "videos", out.parent, warn=quiet, info=quiet)
    assert (s.done, s.failed) == (3, 0), s.failures
    return out


def test_auditory_slowfast_per_segment_cache(asf_cache, synth_data):
    c = open_cache(asf_cache)
    assert c.shape == (3, 1, 1, 2304) and c.counts()["done"] == 3
    a = c.attrs
    assert a["backbone"] == ASF and a["audio_rate"] == 24000 and a["audio_window_samples"] == 23975
    assert a["source"] == "pyav sound" and a["bn_calibration"].startswith("first segments (sound): ")
    assert str(a["source_videos"][0]).startswith("P04_01 128x96")  # the file read, as for frames
    f = c.features().astype(np.float32)
    assert np.isfinite(f).all() and np.abs(f).max() > 0
    # each segment its own sound (labels decide it): no two rows alike
    flat = f.reshape(3, -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert (dist + np.eye(3) * 1e9).min() > 1e-3 * np.linalg.norm(flat, axis=1).mean()
    # frame_index: the frame shown at each window's centre (a segment's middle, K = 1)
    ann = {s.narration_id: s for s in epic.Annotations(synth_data / "annotations").segments("validation")}
    fps = 60 if c.attrs["source_videos"][0].split()[2] == "60" else 30
    mid = [(ann[n].start + ann[n].stop) / 2 for n in c.narration_id]
    np.testing.assert_array_equal(c.frame_index[:, 0], np.floor(np.array(mid) * fps + 1e-6).astype(int))
    assert tools.verify(asf_cache) == ([], [])


def test_cli_lists_and_extracts_sound(synth_data, tmp_path, wav2vec):
    r = runner.invoke(app, ["backbones"], terminal_width=200)
    assert r.exit_code == 0 and "audio models" in r.output and "24000 Hz" in r.output and "0.999 s" in r.output
    r = runner.invoke(app, ["backbones", ASF], terminal_width=200)
    assert r.exit_code == 0 and "23975 samples" in r.output and "128 HTK bins" in r.output, r.output
    root = synth_data
    args = ["extract", "--backbone", wav2vec, "--weights", "DEFAULT", "--split", "validation", "--frames", "3",
            "--annotations", str(root / "annotations"), "--videos", str(root / "videos"), "--features",
            str(tmp_path), "--workers", "1", "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.rglob("validation.h5")
    c = open_cache(path)
    assert c.shape == (6, 1, 3, 32) and c.counts()["done"] == 6 and c.attrs["audio_rate"] == 16000
    assert c.attrs["audio_frontend"] == "transformers Wav2Vec2FeatureExtractor"
    # views of sound are refused before anything is written
    r = runner.invoke(app, [*args, "--views", "2", "--out", str(tmp_path / "v2.h5")])
    assert r.exit_code == 1 and "--views 2: audio features have one view" in r.output
    assert not (tmp_path / "v2.h5").exists()


# ---------------------------------------------------------------- custom sound tracks


def one_video(root: Path, sound: np.ndarray | None, duration: float = 6.0, segments=((0.5, 1.5), (4.0, 5.5)),
              codec: str = "pcm_s16le") -> Path:  # fmt: skip
    """A dataset whose train split is one 30 fps video (P01_01) with ``sound`` as its track
    (float32 at synth.SOUND_RATE; None: no sound track), validation a second one."""
    videos = [
        synth._Video("P01_01", "P01", 30, duration, 1,
                     [synth._Segment(f"P01_01_{i}", a, b, 0, 0) for i, (a, b) in enumerate(segments)]),
        synth._Video("P02_01", "P02", 30, 2.0, 2, [synth._Segment("P02_01_0", 0.5, 1.5, 1, 1)]),
    ]  # fmt: skip
    synth.write_annotations(videos, synth.SynthConfig(videos=2, segments=1), root / "annotations")
    for v, s in zip(videos, (sound, synth.render_sound(videos[1], synth.NOUNS)), strict=True):
        path = root / "videos" / v.participant_id / "videos" / f"{v.video_id}.MP4"
        synth.write_video(v, path, 64, 64, sound=s, codec=codec)
    return root


def tone(duration: float, start: float, stop: float, rate: int = synth.SOUND_RATE) -> np.ndarray:
    """Exact silence, and a 1 kHz tone from ``start`` to ``stop`` seconds."""
    t = np.arange(round(duration * rate)) / rate
    return np.where((t >= start) & (t < stop), 0.3 * np.sin(2 * np.pi * 1000 * t), 0).astype(np.float32)


@pytest.mark.parametrize("codec", ["pcm_s16le", "aac"])
def test_a_tone_that_starts_at_t_is_found_at_t(codec, tmp_path, wav2vec):
    """A dense store at 20/s of a track silent but for a tone over [3.0, 4.5) s: a feature
    stands for the window centred on its time, so the first one that hears the tone is the
    first whose window's end passes 3.0 s, the last the last whose start is before 4.5 s.
    Found: onset = first such time + half a window, offset = last such time - half a window.
    (AAC spreads a transient over its 1024-sample frames: a few ms more slack.)"""
    root = one_video(tmp_path / "data", tone(6.0, 3.0, 4.5), codec=codec)
    out = tmp_path / "dense.h5"
    s = extract(cfg(backbone=wav2vec, weights="DEFAULT", split="train", frames=8, dense="20", out=out),
                root / "annotations", root / "videos", tmp_path, warn=quiet, info=quiet)  # fmt: skip
    assert s.failed == 0
    c = open_cache(out)
    times = c.time.reshape(-1)
    feats = c.features().astype(np.float32).reshape(len(times), -1)
    keep = np.isfinite(times) & (np.arange(len(times)) < len(np.unique(times[np.isfinite(times)])))
    times, feats = times[keep], feats[keep]
    assert np.allclose(np.diff(times), 0.05)  # 20 positions a second, from 0.025 s
    silent = np.linalg.norm(feats - feats[0], axis=1) < 1e-3  # exact silence: one and the same feature
    heard = times[~silent]
    half = 0.5  # wav2vec2 reads 1 s windows
    slack = 0.05 + (0.03 if codec == "aac" else 0.0)
    assert abs(heard.min() + half - 3.0) <= slack and abs(heard.max() - half - 4.5) <= slack, heard
    assert silent[times + half < 3.0 - slack].all() and silent[times - half > 4.5 + slack].all()
    # the frame_index of a position: the frame shown at its time (30 fps, from 0)
    shown = c.frame_index.reshape(-1)[keep]
    np.testing.assert_array_equal(shown, np.floor(times * 30 + 1e-6).astype(int))


def test_auditory_slowfast_dense_store(tmp_path):
    """A random Auditory SlowFast store at 1/s of a silent track with a tone over [3.1, 4.4) s
    (0.1 s from the nearest window's edge: the 48 -> 24 kHz resampler's filter rings a few
    samples ahead of an onset): the windows centred at 3.5 and 4.5 s hear it, those at 0.5-2.5
    and 5.5 s are one and the same feature (silence)."""
    root = one_video(tmp_path / "data", tone(6.0, 3.1, 4.4))
    out = tmp_path / "asf.dense.h5"
    s = extract(cfg(backbone=ASF, weights="none", split="train", frames=3, dense="1", out=out), root / "annotations",
                root / "videos", tmp_path, warn=quiet, info=quiet)  # fmt: skip
    assert (s.done, s.failed) == (2, 0)
    c = open_cache(out)
    assert c.dense and c.shape == (2, 1, 3, 2304)
    np.testing.assert_allclose(c.time.reshape(-1), [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    f = c.features().astype(np.float32).reshape(6, -1)
    silent = np.linalg.norm(f - f[0], axis=1) <= 1e-3 * np.linalg.norm(f[0])
    assert silent.tolist() == [True, True, True, False, False, True]


def test_a_video_without_sound_is_refused_in_one_line(tmp_path, wav2vec):
    root = one_video(tmp_path / "data", None)
    out = tmp_path / "f.h5"
    with pytest.raises(EkxError, match=r"1 video\(s\) have no sound .*P01_01 \(P01_01.MP4\): no sound track"):
        extract(cfg(backbone=wav2vec, weights="DEFAULT", split="train", out=out), root / "annotations",
                root / "videos", tmp_path, warn=quiet, info=quiet)  # fmt: skip
    assert not out.exists()


def test_a_short_sound_track_fails_the_segments_it_does_not_cover(tmp_path, wav2vec):
    """A 6 s video whose track ends at 3 s: the segment at 0.5-1.5 s is extracted, the one at
    4.0-5.5 s fails naming the video and both spans - never silent zeros."""
    root = one_video(tmp_path / "data", tone(3.0, 0.2, 2.0))
    out = tmp_path / "f.h5"
    s = extract(cfg(backbone=wav2vec, weights="DEFAULT", split="train", out=out), root / "annotations",
                root / "videos", tmp_path, warn=quiet, info=quiet)  # fmt: skip
    assert (s.done, s.failed) == (1, 1)
    ((nid, why),) = failures(out)
    assert nid == "P01_01_1"
    assert "sound track of P01_01.MP4 covers 0.00-3.00 s, shorter than the video" in why
    assert "windows need 3.88-5.62 s" in why  # centres 4.375 and 5.125 s, half a second each side


# ---------------------------------------------------------------- the cache contract

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from ekx.extract import writer
    real, done = writer.WriterThread.put, [0]
    def put(self, item):
        real(self, item)
        if item[0] == "done":
            done[0] += 1
            if done[0] == 3:  # the third segment handed to its writer thread: kill -9, now
                os.kill(os.getpid(), signal.SIGKILL)
    writer.WriterThread.put = put
    from ekx.cli import app
    app(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical_and_shards_merge(synth_data, tmp_path, wav2vec):
    ann, vids = synth_data / "annotations", synth_data / "videos"
    common = dict(backbone=wav2vec, weights="DEFAULT", split="train", frames=2, limit=8)
    ref = tmp_path / "ref.h5"
    assert extract(cfg(**common, out=ref), ann, vids, tmp_path, warn=quiet, info=quiet).done == 8
    out = tmp_path / "killed.h5"
    args = ["extract", "--backbone", wav2vec, "--split", "train", "--frames", "2", "--limit", "8", "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--annotations", str(ann), "--videos", str(vids),
            "--out", str(out)]  # fmt: skip
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = open_cache(out).counts()["done"]  # what the writer thread wrote before the kill: 0 to 3 rows
    assert done <= 3
    s = extract(cfg(**common, out=out), ann, vids, tmp_path, warn=quiet, info=quiet)
    assert s.processed == 8 - done and s.done == 8
    np.testing.assert_array_equal(open_cache(out).features(), open_cache(ref).features())
    np.testing.assert_array_equal(open_cache(out).frame_index, open_cache(ref).frame_index)
    # two shards merge to the single-process cache, row for row
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, p in enumerate(shards):
        extract(cfg(**common, shard=(i, 2), out=p), ann, vids, tmp_path, warn=quiet, info=quiet)
    tools.merge(tmp_path / "merged.h5", shards)
    merged = open_cache(tmp_path / "merged.h5")
    assert (merged.status == store.DONE).all()
    np.testing.assert_array_equal(merged.features(), open_cache(ref).features())
