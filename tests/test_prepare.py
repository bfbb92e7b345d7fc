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


@pytest.mark.slow
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


# ---------------------------------------------------------------- damaged sources, concurrent runs


def write_moov_first(path: Path, frames: int = 60) -> None:
    """A 30 fps H.264 MP4 with its index (moov) before the data, as cameras and `-movflags
    faststart` write it: cut short, it still opens and lists every frame."""
    import av

    rng = np.random.default_rng(1)  # noise: every frame is a few KiB, so a cut loses whole frames
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"preset": "ultrafast", "bf": "0"}
        for _ in range(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), np.uint8), format="rgb24")))
        c.mux(s.encode())


def packets(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of each video packet."""
    import av

    with av.open(str(path)) as c:
        return [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]


def test_a_source_cut_short_fails_and_leaves_no_copy(tmp_path):
    whole = tmp_path / "whole.mp4"
    write_moov_first(whole)
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    src = tmp_path / "src" / "P01" / "videos"
    src.mkdir(parents=True)
    # cut inside a frame (the decoder drops it) and cut on a frame's end (every packet in the file
    # decodes: only the index's 60 frames tell)
    pos, size = packets(whole)[50]
    (src / "P01_01.MP4").write_bytes(data[:-3000])
    (src / "P01_02.MP4").write_bytes(data[: pos + size])
    dst = tmp_path / "copy"
    result = runner.invoke(app, ["prepare", str(tmp_path / "src"), str(dst), "--short-side", "48"], terminal_width=1000)
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "0 videos transcoded" in said and "2 failed" in said, said
    assert "P01_01.MP4: the index lists 60 frames, the file holds 59" in said, said
    assert "P01_02.MP4: the index lists 60 frames, the file holds 51" in said, said
    assert not list(dst.rglob("*.MP4*"))  # neither a copy nor a .part
    # the check is the copy's count and span against the source's, before the rename: a source
    # whose frames do not all decode fails the same way (here with no index to compare with)
    a, b = pp.Summary(60, 0.0, 1.97, 0), pp.Summary(58, 0.0, 1.9, 0)
    assert pp.mismatch(tmp_path / "b", a, b) == f"{tmp_path / 'b'}: 58 frames, the source has 60"


def hole(path: Path, packet: int = 30) -> None:
    """Zero 200 bytes inside one packet: what a second writer truncating the file leaves."""
    pos, size = packets(path)[packet]
    assert size > 300
    data = bytearray(path.read_bytes())
    data[pos + 10 : pos + 210] = bytes(200)
    path.write_bytes(bytes(data))


def test_verify_decodes_the_whole_copy(tmp_path):
    src = tmp_path / "src.mp4"
    write_moov_first(src)
    dst = tmp_path / "copy.mp4"
    assert pp.transcode(src, dst, pp.Settings(short_side=48, preset="ultrafast")) == 60
    assert pp.verify(src, dst) is None
    hole(dst)  # every packet is still there, with its size and time: only decoding finds it
    problem = pp.verify(src, dst)
    assert problem and problem.startswith(f"{dst}: ") and "decode" in problem and "re-run ekx prepare" in problem


def test_two_prepares_of_one_video_never_write_one_file_at_once(source, tmp_path):
    """A second `ekx prepare` of a video another one is writing waits for it, then finds the
    copy there; it never truncates the other's `.part` (which would leave a hole in the copy)."""
    import fcntl
    import threading

    video = sorted((source / "videos").rglob("*.MP4"))[0]
    settings = pp.Settings(short_side=48, preset="ultrafast")
    done_elsewhere = tmp_path / "elsewhere.MP4"
    pp.transcode(video, done_elsewhere, settings)
    dst = tmp_path / "copy"
    out = dst / video.relative_to(source / "videos")
    part = out.with_name(out.name + ".part")
    part.parent.mkdir(parents=True)
    # the first writer: holds its .part, half written
    first = part.open("wb")
    fcntl.flock(first, fcntl.LOCK_EX)
    first.write(done_elsewhere.read_bytes()[:1000])
    first.flush()
    outcomes: list = []
    second = threading.Thread(target=lambda: outcomes.extend(pp.prepare(source / "videos", dst, settings, [video], 1)))
    second.start()
    second.join(3.0)  # far longer than this transcode takes
    assert second.is_alive() and not out.exists(), "the second run did not wait for the first"
    assert part.read_bytes() == done_elsewhere.read_bytes()[:1000]  # untouched
    # the first finishes: the rest of its copy, renamed, lock released
    first.write(done_elsewhere.read_bytes()[1000:])
    first.flush()
    os.replace(part, out)
    first.close()
    second.join(60)
    assert [o.status for o in outcomes] == ["skipped"]
    assert out.read_bytes() == done_elsewhere.read_bytes() and not part.exists()
    assert pp.verify(video, out) is None
