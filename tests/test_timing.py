"""Frame timing (issue 18): the frame displayed at time t through the stream's own
presentation times (variable rate, a stream starting after 0), R(2+1)D clips in seconds,
and the sampling rule in the cache identity. Test videos are written here with PyAV and
explicit pts; every frame carries its index (`ekx.synth` stamp). Each source (decord,
torchcodec) is held to the same rule."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import decord
import numpy as np
import pytest

from ekx import epic
from ekx.cache import identity
from ekx.extract import sources
from ekx.extract.sources import decode_video
from ekx.extract.video import CLIP_RATE, Request, sampling_rule
from ekx.synth import _stamp, read_stamp

TIME_BASE = Fraction(1, 1000)
VIDEO_SOURCES = ("decord", "torchcodec", "pyav")
MISREADING_MPEG = ("decord", "torchcodec")  # other frames than asked from MPEG-TS/PS: refused there


def write_pts_video(
    path: Path,
    pts_ms: list[int],
    audio_from_0: bool = False,
    size=(192, 256),
    codec: str = "libx264",
    gop: int = 10,
    bframes: int = 0,
    time_base: Fraction = TIME_BASE,
) -> Path:
    """H.264 (or ``codec``) frames shown at ``pts_ms`` (ms on the file's timeline, stored in
    ``time_base`` units; frame i stamped i), a keyframe every ``gop`` frames, up to
    ``bframes`` B-frames in a row; the container from the suffix (.ts: MPEG-TS, .mpg:
    MPEG-PS); ``audio_from_0``: a silent audio track from 0 s, so the file's timeline starts
    at 0 even though the first frame's pts does not."""
    import av

    h, w = size
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=30)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.time_base = time_base
        v.codec_context.time_base = time_base
        if codec == "libx264":
            v.options = {"crf": "12", "g": str(gop), "bf": str(bframes)}
        else:
            v.codec_context.bit_rate, v.codec_context.gop_size = 4_000_000, gop
            v.codec_context.max_b_frames = bframes
        if audio_from_0:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
            for k in range(int((pts_ms[-1] / 1000 + 0.1) * 16000 / 1024) + 1):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, k * 1024, Fraction(1, 16000)
                for pk in a.encode(af):
                    c.mux(pk)
            for pk in a.encode():
                c.mux(pk)
        for i, p in enumerate(pts_ms):
            img = np.full((h, w, 3), 90, np.uint8)
            _stamp(img, i)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = round(Fraction(p, 1000) / time_base), time_base
            for pk in v.encode(f):
                c.mux(pk)
        for pk in v.encode():
            c.mux(pk)
    return path


def displayed_at(pts_ms: list[int], t) -> np.ndarray:
    """The frame a player shows at each time t (s): the last one with pts <= t, else 0."""
    p = np.asarray(pts_ms) / 1000
    return np.maximum(np.searchsorted(p, np.asarray(t) + 1e-9, side="right") - 1, 0)


def centres(r: Request, k: int) -> np.ndarray:
    return r.start + (np.arange(k) + 0.5) * (r.stop - r.start) / k


def decode(name: str, path: Path, reqs: list[Request], k: int, clip_len: int = 1) -> dict:
    src = sources.get(name)
    if src.missing():
        pytest.skip(src.missing())
    return {r.row: r for r in src.decode(path, reqs, k, clip_len)}


def stamps(res) -> list[int]:
    assert res.error is None, res.error
    return [read_stamp(f) for f in res.frames]


# frame durations of 20-80 ms, as a phone's variable-rate footage
VFR_PTS = [int(p) for p in np.concatenate([[0], np.cumsum(np.random.default_rng(0).choice([20, 33, 50, 80], 89))])]


@pytest.fixture(scope="module")
def vfr(tmp_path_factory) -> Path:
    return write_pts_video(tmp_path_factory.mktemp("timing") / "vfr.mp4", VFR_PTS)


@pytest.fixture(scope="module")
def late(tmp_path_factory) -> tuple[Path, list[int]]:
    pts = [1500 + 40 * i for i in range(60)]  # 25 fps from 1.5 s, audio from 0
    return write_pts_video(tmp_path_factory.mktemp("timing") / "late.mp4", pts, audio_from_0=True), pts


@pytest.mark.parametrize("name", VIDEO_SOURCES)
def test_variable_frame_rate_takes_the_frame_displayed_at_each_time(name, vfr):
    """A variable-rate video: the sampled frames are those a player shows at the sampled
    times (by pts), not index = round(t * average fps) - which picks other frames here."""
    reqs = [Request(0, 0.1, 1.9), Request(1, 2.0, 4.0), Request(2, 0.0, 0.6)]
    results = decode(name, vfr, reqs, 12)
    fps = decord.VideoReader(str(vfr)).get_avg_fps()
    differs = 0
    for r in reqs:
        want = displayed_at(VFR_PTS, centres(r, 12))
        assert stamps(results[r.row]) == want.tolist(), r
        assert results[r.row].centres.tolist() == want.tolist()
        differs += int((np.round(centres(r, 12) * fps) != want).sum())
    assert differs > 10  # the old rule would have failed this video


@pytest.mark.parametrize("name", VIDEO_SOURCES)
def test_stream_starting_after_zero_is_timed_on_the_files_clock(name, late):
    """The video stream starts 1.5 s into the file (audio from 0): before 1.5 s the first
    frame shows, at 2.0 s the frame whose pts is 2.0 s; decord alone numbers from 0."""
    path, pts = late
    reqs = [Request(0, 0.0, 1.2), Request(1, 1.9, 2.7), Request(2, 3.0, 3.8)]
    results = decode(name, path, reqs, 4)
    for r in reqs:
        assert stamps(results[r.row]) == displayed_at(pts, centres(r, 4)).tolist(), r
    assert stamps(results[0]) == [0, 0, 0, 0]
    # past the end (last frame at 3.86 s, shown until 3.90 s) is an error, not a clamp
    beyond = decode(name, path, [Request(0, 4.0, 6.0)], 4)[0]
    assert beyond.error is not None and "beyond the video's end" in beyond.error


def test_constant_rate_takes_the_displayed_frame_not_the_nearest(tmp_path):
    """At 30 fps, t = 0.09 s shows frame 2 (from 0.0667 s to 0.1 s); rounding gave 3."""
    path = write_pts_video(tmp_path / "cfr.mp4", [round(1000 * i / 30) for i in range(60)])
    res = next(decode_video(path, [Request(0, 0.08, 0.10)], 1, 1))
    assert stamps(res) == [2]


def test_clip_spans_the_same_seconds_at_30_and_60_fps(synth_data):
    """R(2+1)D's 8-frame clips: 1/15 s apart on a 30 and a 60 fps video alike (7/15 s from
    first to last), centred on the sampled time; 8 native frames spanned 233 vs 117 ms."""
    ann = epic.Annotations(synth_data / "annotations")
    paths = epic.index_videos(synth_data / "videos")
    spans = {}
    for s in ann.segments("train"):
        fps = decord.VideoReader(str(paths[s.video_id])).get_avg_fps()
        if round(fps) in spans or s.duration < 2:
            continue
        res = next(decode_video(paths[s.video_id], [Request(0, s.start, s.stop)], 2, 8))
        got = np.array(stamps(res)).reshape(2, 8)
        assert (got[:, 4] == res.centres).all()  # the middle frame is the sampled one
        spans[round(fps)] = (got[:, -1] - got[:, 0]) / fps
        assert np.allclose(np.diff(got, axis=1) / fps, 1 / CLIP_RATE, atol=1.01 / fps)
    assert set(spans) == {30, 60}
    for span in spans.values():
        assert np.allclose(span, 7 / CLIP_RATE, atol=1.01 / 30)


def test_sampling_rule_is_part_of_the_cache_identity(synth_data, tmp_path):
    """The cache records the rule (pts, clips in seconds) and the resize that ran; a cache
    made under the old rule (round(t * fps), native clips) refuses to mix with a new one."""
    from ekx.cache.reader import open_cache
    from ekx.extract.pipeline import ExtractConfig, extract

    cfg = ExtractConfig(split="validation", weights="none", frames=2, workers=0, limit=1, out=tmp_path / "f.h5")
    extract(cfg, synth_data / "annotations", synth_data / "videos", tmp_path, warn=lambda m: None)
    attrs = dict(open_cache(tmp_path / "f.h5").attrs)
    assert attrs["sampling"] == sampling_rule() and "last pts <= t" in attrs["sampling"]
    assert attrs["resize"] == "decoder" and "scaler" in attrs["resize_method"]
    old = {**attrs, "sampling": "centres of K equal parts of [start, stop); frame = round(t * decoded fps)"}
    ident = identity.extraction
    assert any(m.startswith("sampling") for m in identity.mismatch(ident(old), ident(attrs)))
    assert any(
        m.startswith("resize") for m in identity.mismatch(ident({**attrs, "resize": "torchvision"}), ident(attrs))
    )


def test_prepared_copy_keeps_every_frames_time(vfr, late, tmp_path):
    """`ekx prepare`'s copy (video only, MP4) of a variable-rate and a late-start video:
    the same segments select the same frames (before, the late start's copy began at 0)."""
    from ekx.prepare import Settings, transcode

    for src, reqs in (
        (vfr, [Request(0, 0.1, 1.9), Request(1, 2.0, 4.0)]),
        (late[0], [Request(0, 0.0, 1.2), Request(1, 1.9, 2.7), Request(2, 3.0, 3.8)]),
    ):
        copy = tmp_path / f"copy-{src.name}"
        transcode(src, copy, Settings(short_side=192))
        a, b = decode("decord", src, reqs, 6), decode("decord", copy, reqs, 6)
        for r in reqs:
            assert stamps(a[r.row]) == stamps(b[r.row]), (src.name, r)


# frame i at i / 30 s; keyframes every 30 frames - a GOP as the stamped video had
GOP30_PTS = [round(1000 * i / 30) for i in range(120)]
TS_PS = {  # container, codec, B-frames: what decord got for frames [33, 41, 48, 56] (measured)
    "h264-bframes.ts": ("libx264", 2),  # [63, 71, 78, 86]: one GOP late
    "mpeg2.ts": ("mpeg2video", 0),  # [63, 71, 78, 86]
    "mpeg2-bframes.mpg": ("mpeg2video", 2),  # [5, 13, 20, 28]
    "h264.mpg": ("libx264", 0),  # [28, 44, 51, 59]
}


@pytest.mark.parametrize("source", MISREADING_MPEG)
@pytest.mark.parametrize("name", sorted(TS_PS))
def test_video_sources_refuse_mpeg_ts_and_ps_instead_of_returning_other_frames(source, name, tmp_path):
    """decord on MPEG-TS/PS returned other frames than asked, with no error: one GOP late on
    H.264 with B-frames in MPEG-TS (the issue's stamped video: [63, 71, 78, 86] for
    [33, 41, 48, 56]), and likewise MPEG-2 in TS or PS with or without B-frames and H.264 in
    PS (the shared kivy_cityCC0.mpg: frame i + 12, its GOP). torchcodec too: frame 30 for
    frames [1, 5, 9, 13] of the H.264 TS, then a decode error; frame 0 throughout the H.264
    PS. Each segment now fails in one line naming the file and the way out."""
    codec, bframes = TS_PS[name]
    path = write_pts_video(tmp_path / name, GOP30_PTS, codec=codec, gop=30, bframes=bframes, time_base=Fraction(1, 30))
    res = decode(source, path, [Request(0, 1.0, 2.0)], 4)[0]
    got = None if res.error else stamps(res)
    assert got is None, f"{source} read {got} (displayed: {displayed_at(GOP30_PTS, centres(Request(0, 1.0, 2.0), 4))})"
    assert name in res.error and "MPEG-TS/PS" in res.error and "ekx prepare" in res.error, res.error
    assert "\n" not in res.error


TS_REQUESTS = [Request(0, 1.0, 2.0), Request(1, 0.0, 0.5), Request(2, 2.5, 3.9)]


@pytest.mark.parametrize("name", sorted(TS_PS))
def test_auto_reads_mpeg_ts_and_ps_with_pyav_and_gets_the_displayed_frames(name, tmp_path):
    """The four files decord misread (and torchcodec): `--source auto` picks PyAV for them
    (decord where every video is an MP4), which decodes in order and tells frames by pts as
    `ekx prepare` does, and reads the frames displayed at the sampled times - also for H.264
    in MPEG-PS, whose packets carry a pts only now and then (times by prepare's rule)."""
    codec, bframes = TS_PS[name]
    videos = tmp_path / "videos"
    videos.mkdir()
    tb = Fraction(1, 30)
    write_pts_video(
        videos / f"P01_01{Path(name).suffix}", GOP30_PTS, codec=codec, gop=30, bframes=bframes, time_base=tb
    )
    write_pts_video(videos / "P01_02.mp4", GOP30_PTS[:10])
    assert sources.choose("auto", {"P01_01", "P01_02"}, videos, None).name == "pyav"
    assert sources.choose("auto", {"P01_02"}, videos, None).name == "decord"
    path = epic.index_videos(videos)["P01_01"]
    got = decode("pyav", path, TS_REQUESTS, 4)
    for r in TS_REQUESTS:
        assert stamps(got[r.row]) == displayed_at(GOP30_PTS, centres(r, 4)).tolist(), r
    assert stamps(got[0]) == [33, 41, 48, 56]


def test_prepared_copy_of_mpeg_ts_with_b_frames_reads_right_with_decord(tmp_path):
    """A way out the refusal names: `ekx prepare`'s MP4 copy, read by decord, gives the frames
    displayed at the sampled times (the original gave [63, 71, 78, 86] for [33, 41, 48, 56])."""
    from ekx.prepare import Settings, transcode

    path = write_pts_video(tmp_path / "b.ts", GOP30_PTS, gop=30, bframes=2)
    copy = tmp_path / "b.mp4"
    transcode(path, copy, Settings(short_side=192))
    got = decode("decord", copy, TS_REQUESTS, 4)
    for r in TS_REQUESTS:
        assert stamps(got[r.row]) == displayed_at(GOP30_PTS, centres(r, 4)).tolist(), r
    assert stamps(got[0]) == [33, 41, 48, 56]


@pytest.mark.parametrize("name", VIDEO_SOURCES)
def test_frame_times_are_the_containers_pts_in_float64(name, tmp_path):
    """An hour into a video, decord's own timestamps (float32) are off by up to 1.2e-4 s, and
    a time just after a frame's pts took the frame before it (here 16 of 40; on a 60-min
    59.94 fps video 0.3% of sampled times). Every reader takes the pts from the container
    (PyAV), in float64."""
    pts = [0] + [3_600_000 + round(k * 1001 / 60) for k in range(40)]  # 59.94 fps from 1 h
    path = write_pts_video(tmp_path / "hour.mp4", pts, size=(96, 256))
    reqs = [Request(k, pts[k] / 1000 + 2e-5, pts[k] / 1000 + 2e-5) for k in range(1, len(pts))]
    got = decode(name, path, reqs, 1)
    assert [stamps(got[r.row])[0] for r in reqs] == [r.row for r in reqs]
    reader = sources.get(name).open(path)
    assert reader.timestamps().dtype == np.float64
    assert np.abs(reader.timestamps() - np.asarray(pts) / 1000).max() < 1e-9
    reader.close()
