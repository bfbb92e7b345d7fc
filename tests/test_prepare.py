"""`ekx prepare`: the training copy keeps every frame and its timestamp (barcodes), is
resumable after kill -9, is checked by --verify, and its features never mix with the
originals'."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ekx import EkxError
from ekx import prepare as pp
from ekx.cli import app
from ekx.synth import SynthConfig, _stamp, read_stamp, synthesize

runner = CliRunner()


def decode_all(path: Path) -> tuple[list[float], list[int], tuple[int, int]]:
    """(frame times in s, barcode of each frame, (h, w)) by PyAV, in display order."""
    import av

    times, stamps, shape = [], [], (0, 0)
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            img = f.to_ndarray(format="rgb24")
            times.append(float(f.pts * f.time_base))
            stamps.append(read_stamp(img))
            shape = img.shape[:2]
    return times, stamps, shape


def write_vfr(path: Path, width: int = 192, height: int = 144) -> list[float]:
    """A variable-frame-rate H.264 video whose stream starts at 0.35 s: gaps of 1/60 to
    1/10 s between frames (as phone footage), each frame barcoded with its index."""
    import av

    rng = np.random.default_rng(0)
    tb = Fraction(1, 1000)
    pts = np.cumsum(rng.choice([17, 33, 50, 100], size=40)) + 350
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.time_base = tb
        s.codec_context.time_base = tb
        s.options = {"preset": "ultrafast", "crf": "12", "bf": "0"}
        for i, p in enumerate(pts):
            img = np.full((height, width, 3), 90, np.uint8)
            _stamp(img, i)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(p), tb
            c.mux(s.encode(f))
        c.mux(s.encode())
    return [float(p) / 1000 for p in pts]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Videos at 30, 50 and 60 fps (synthetic, barcoded) and one variable-rate video."""
    root = tmp_path_factory.mktemp("prep-src")
    synthesize(root, SynthConfig(videos=3, segments=2, width=256, height=192, fps=(30, 50, 60), seed=5))
    write_vfr(root / "videos" / "P09" / "videos" / "P09_01.MP4")
    return root


def test_target_size_keeps_aspect_never_upscales():
    assert pp.target_size(1920, 1080, 320) == (568, 320)
    assert pp.target_size(256, 192, 320) == (256, 192)
    assert pp.target_size(1080, 1920, 256) == (256, 456)  # portrait: the short side is the width
    assert pp.default_short_side() == 320  # EfficientNet-B3's resize is the largest


def test_prepared_copy_keeps_every_frame_and_timestamp(source, tmp_path):
    dst = tmp_path / "copy"
    result = runner.invoke(
        app,
        ["prepare", str(source / "videos"), str(dst), "--short-side", "144", "--workers", "2", "--verify"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    originals = sorted((source / "videos").rglob("*.MP4"))
    assert len(originals) == 4
    for src in originals:
        out = dst / src.relative_to(source / "videos")
        t_src, s_src, shape_src = decode_all(src)
        t_out, s_out, shape_out = decode_all(out)
        assert len(t_out) == len(t_src), src.name
        np.testing.assert_allclose(t_out, t_src, atol=1e-6, err_msg=src.name)  # same timestamp per frame
        assert s_out == s_src == list(range(len(s_src))), src.name  # same frame at each index
        assert shape_src == (192, 256) if "P09" not in src.name else (144, 192)
        assert min(shape_out) == 144
    vfr = decode_all(dst / "P09" / "videos" / "P09_01.MP4")[0]
    assert vfr[0] > 0.35 and len(set(np.round(np.diff(vfr), 3))) > 1  # starts late, still variable
    # decord, the default reader, sees the same frame count and times
    import decord

    for src in originals:
        a, b = decord.VideoReader(str(src)), decord.VideoReader(str(dst / src.relative_to(source / "videos")))
        assert len(a) == len(b)
        np.testing.assert_allclose(a.get_frame_timestamp(range(len(a))), b.get_frame_timestamp(range(len(b))))
    # keyframes every ~0.5 s: a 60 fps video gets one every 30 frames
    sixty = next(p for p in originals if decord.VideoReader(str(p)).get_avg_fps() == 60)
    keys = decord.VideoReader(str(dst / sixty.relative_to(source / "videos"))).get_key_indices()
    assert np.diff(keys).max() <= 30
    manifest = pp.read_manifest(dst)
    assert manifest is not None and manifest.short_side == 144
    # a second run finds everything done; other settings into the same copy are refused
    again = runner.invoke(app, ["prepare", str(source / "videos"), str(dst), "--short-side", "144"])
    said = " ".join(again.output.split())
    assert again.exit_code == 0 and "0 videos transcoded" in said and "4 already there" in said, said
    other = runner.invoke(app, ["prepare", str(source / "videos"), str(dst), "--short-side", "96"])
    assert other.exit_code == 1 and "other settings" in other.output


def test_verify_catches_a_truncated_copy(source, tmp_path):
    dst = tmp_path / "copy"
    assert runner.invoke(app, ["prepare", str(source / "videos"), str(dst), "--short-side", "96"]).exit_code == 0
    victim = sorted(dst.rglob("*.MP4"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # an interrupted copy to another disk
    result = runner.invoke(
        app, ["prepare", str(source / "videos"), str(dst), "--short-side", "96", "--verify"], terminal_width=1000
    )
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "problem:" in said and f"{victim.name}: unreadable" in said and "re-run ekx prepare" in said, said
    assert pp.verify(sorted((source / "videos").rglob("*.MP4"))[1], sorted(dst.rglob("*.MP4"))[1]) is None


@pytest.mark.slow
def test_prepare_resumes_after_kill_9(source, tmp_path):
    dst = tmp_path / "copy"
    # a big enough input that the kill lands mid-way: 6 x 20 s videos
    src = tmp_path / "src"
    synthesize(src, SynthConfig(videos=6, segments=8, width=320, height=240, fps=(60,), seed=1, min_length=2.0))
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ekx", "prepare", str(src / "videos"), str(dst), "--workers", "1", "--crf", "30"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(dst.rglob("*.MP4")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(dst.rglob("*.MP4"))
    assert 1 <= len(finished) < 6, log.read_text()
    for out in finished:  # whatever carries a final name is complete
        assert pp.verify(src / "videos" / out.relative_to(dst), out) is None
    result = runner.invoke(app, ["prepare", str(src / "videos"), str(dst), "--crf", "30", "--verify"])
    assert result.exit_code == 0, result.output
    assert f"{len(finished)} already there" in " ".join(result.output.split())
    assert len(sorted(dst.rglob("*.MP4"))) == 6


@pytest.mark.slow
def test_cache_from_prepared_copy_never_mixes_with_originals(synth_data, tmp_path):
    from ekx.extract.pipeline import ExtractConfig, extract
    from ekx.heads import train as tr

    copy = tmp_path / "copy"
    assert runner.invoke(app, ["prepare", str(synth_data / "videos"), str(copy)]).exit_code == 0
    ann, feats = synth_data / "annotations", tmp_path / "features"

    def run(split: str, videos: Path, out: Path | None = None):
        cfg = ExtractConfig(split=split, weights="none", frames=2, workers=0, limit=4, out=out)
        return extract(cfg, ann, videos, feats, warn=lambda m: None)

    train = run("train", synth_data / "videos").path
    val = run("validation", copy).path
    with pytest.raises(EkxError, match="video_input"):  # stage 2: train and validation from different inputs
        tr.load_data(train, val, "cpu")
    with pytest.raises(EkxError, match=r"other parameters \(.*video_input"):  # stage 1: no resume across inputs
        run("train", copy)
    from ekx.cache.reader import open_cache

    assert open_cache(val).attrs["video_input"].startswith("prepared copy: libx264")
    assert open_cache(train).attrs["video_input"] == "original videos"
