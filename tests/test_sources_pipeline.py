"""Stage 1 through the frame sources: the RGB-frames source end to end (cache verified,
identity recorded and enforced), and the per-video decode watchdog with a hanging source."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ekx import epic
from ekx.cache.reader import failures
from ekx.cli import app
from ekx.extract import sources
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.extract.sources.frames import write_frames
from ekx.extract.video import Request, Result

HUNG = {"video": ""}  # the video the hanging source never finishes (set by the test)


class Hanging(sources.Source):
    """decord, except that one video hangs forever inside decode (as decord's get_batch can)."""

    name = "test-hang"
    library = "decord"

    def decode(self, path, requests, k, clip_len, size_fn=None, device="cpu") -> Iterator[Result]:
        if Path(path).stem == HUNG["video"]:
            time.sleep(3600)
        return sources.get("decord").decode(path, requests, k, clip_len, size_fn, device)


@pytest.fixture
def hanging_source():
    """The test's own source, registered for one test only (a plugin, as a user's would be)."""
    from ekx.extract.config import SOURCES

    sources.register(Hanging)
    yield Hanging.name
    del sources.REGISTRY[Hanging.name]
    SOURCES.plugins.discard(Hanging.name)


@pytest.fixture(scope="module")
def tars(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rgb_tar")
    for vid, path in epic.index_videos(synth_data / "videos").items():
        write_frames(path, out / vid.split("_")[0] / "rgb_frames" / f"{vid}.tar")
    return out


def cli(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


@pytest.mark.slow
def test_frames_source_end_to_end_cache_verifies_and_records_its_source(synth_data, tars, tmp_path):
    out = tmp_path / "val.h5"
    common = ["--split", "validation", "--weights", "none", "--frames", "4", "--workers", "1", "--out", str(out)]
    ann = ["--annotations", str(synth_data / "annotations")]
    r = cli("extract", "--source", "frames", "--frames-root", str(tars), *common, *ann)
    assert r.exit_code == 0, r.output
    r = cli("cache", "verify", str(out))
    assert r.exit_code == 0 and "ok" in r.output, r.output
    info = cli("cache", "info", str(out)).output
    assert "decode_device" in info and "torchvision" in info and "official RGB frames" in info
    # the same cache from the videos: refused, naming the source
    r = cli("extract", "--source", "decord", "--videos", str(synth_data / "videos"), *common, *ann)
    assert r.exit_code == 1 and "refusing to mix" in r.output and "source" in r.output
    # auto: no videos at that root, frames there -> the frames source; resumes the same cache
    r = cli("extract", "--videos", str(tmp_path / "none"), "--frames-root", str(tars), *common, *ann)
    assert r.exit_code == 0, r.output


def test_frames_source_needs_its_root(synth_data, tmp_path):
    from ekx import EkxError
    from ekx.extract.pipeline import resolve_source

    plan = epic.Annotations(synth_data / "annotations").segments("validation")
    with pytest.raises(EkxError, match="--frames-root"):
        resolve_source(ExtractConfig(source="frames"), plan, synth_data / "videos", None)
    msg = sources.get("frames").missing_message(["P01_01"], 3, tmp_path)
    assert "no RGB frames under" in msg and "rgb_frames/<video_id>.tar" in msg


@pytest.mark.slow
def test_watchdog_fails_a_hung_videos_segments_and_the_run_goes_on(synth_data, tmp_path, hanging_source):
    ann = epic.Annotations(synth_data / "annotations")
    train = ann.segments("train")
    videos = sorted({s.video_id for s in train})
    HUNG["video"] = videos[-1]  # not among the first segments, which calibrate BatchNorm
    # the hung video waits out the whole limit; 1 s failed healthy videos on a loaded machine
    # (18 failed instead of 6 at load ~8, on the previous code too), so the limit leaves room
    cfg = ExtractConfig(
        split="train", weights="none", frames=4, workers=1, source=hanging_source, decode_timeout=6.0,
        out=tmp_path / "t.h5",
    )  # fmt: skip
    s = extract(cfg, synth_data / "annotations", synth_data / "videos", tmp_path, warn=lambda m: None)
    hung = [x.narration_id for x in train if x.video_id == HUNG["video"]]
    assert s.failed == len(hung) and s.done == len(train) - len(hung)
    reasons = dict(failures(s.path))
    assert sorted(reasons) == sorted(hung)
    assert all("decode watchdog" in r and HUNG["video"] in r for r in reasons.values())


def test_watchdog_passes_results_and_reports_a_crash(synth_data, tmp_path):
    from ekx.extract.sources.watchdog import guarded

    path = epic.index_videos(synth_data / "videos")[sorted(epic.index_videos(synth_data / "videos"))[0]]
    reqs = [Request(0, 0.1, 0.5), Request(1, 0.2, 0.9)]

    def crash():
        yield Result(0, None, None, "fine")
        raise MemoryError("boom")

    got = list(guarded(crash, path, reqs, 30))
    assert [r.row for r in got] == [0, 1] and "decoder crashed: MemoryError: boom" in got[1].error


@pytest.mark.slow
def test_frames_source_features_serve_the_video_sources_head_as_well(demo_workspace, tmp_path):
    """The demo's validation videos read as official RGB frames (per-video tars) instead of
    videos: per segment the features are the video source's but for JPEG (cosine >= 0.98), and
    the demo's LSTM, trained on the video source's features, tells the time-reversed verbs apart
    on them as well (order score within three segments of the video source's, and >= 90).
    Read from frames: the validation segments of the time-reversed verbs (39 of 64), all the
    order score reads. It replaces test_frames_source_trains_a_head_as_well_as_the_video_source,
    which extracted both splits again and trained six LSTMs (three seeds per source) for the same
    claim: the frames equal the video's within one (test_sources.py) and a head cannot tell the
    features apart (here)."""
    import shutil

    import h5py
    import torch

    from ekx import EkxError
    from ekx.demo import DEMO_FRAMES, reversal_scores
    from ekx.extract.pipeline import extract_many
    from ekx.heads import checkpoint as ck
    from ekx.heads.config import TrainConfig
    from ekx.heads.data import load_split
    from ekx.heads.evaluate import predict
    from ekx.runtime import resolve_precision
    from ekx.synth import REVERSED_PAIRS

    workdir, _ = demo_workspace
    video_val = workdir / "features" / "resnet50" / "validation.h5"
    ann = tmp_path / "annotations"  # the demo's, its validation CSV cut to the reversed verbs
    shutil.copytree(workdir / "data" / "annotations", ann)
    with h5py.File(video_val, "r") as f:
        keys = [str(k) for k in f.attrs["verb_classes"]]
        calibration = str(f.attrs["bn_calibration"])
    reversed_ids = {keys.index(v) for pair in REVERSED_PAIRS for v in pair}
    val_csv = ann / epic.SPLIT_FILES["validation"]
    segments = [s for s in epic.load_segments(val_csv) if s.verb_class in reversed_ids]
    keep = {s.narration_id for s in segments}
    lines = val_csv.read_text().splitlines()
    val_csv.write_text("\n".join([lines[0], *(x for x in lines[1:] if x.split(",", 1)[0] in keep)]) + "\n")
    frames_root = tmp_path / "frames"
    # their videos, and the train videos whose segments calibrated the random weights'
    # BatchNorm, so both caches are of one network
    wanted = {s.video_id for s in segments} | {n.rsplit("_", 1)[0] for n in calibration.split(": ")[-1].split(",")}
    for vid, path in epic.index_videos(workdir / "data" / "videos").items():
        if vid in wanted:
            write_frames(path, frames_root / vid.split("_")[0] / "rgb_frames" / f"{vid}.tar")
    cfg = ExtractConfig(split="validation", weights="none", frames=DEMO_FRAMES, workers=1, source="frames")
    (s,) = extract_many(
        cfg, ann, tmp_path / "no-videos", tmp_path / "features", warn=lambda m: None, frames_root=frames_root
    )
    assert s.failed == 0 and s.done == s.total == len(keep) >= 30
    frames_val = tmp_path / "features" / "resnet50" / "validation.h5"
    cpu = torch.device("cpu")
    video, frames = load_split(video_val, cpu), load_split(frames_val, cpu)
    assert frames.attrs["bn_calibration"] == calibration
    row_of = {n: i for i, n in enumerate(video.narration_id)}
    same = torch.tensor([row_of[frames.narration_id[i]] for i in frames.rows.tolist()])
    assert set(same.tolist()) <= set(video.rows.tolist())
    a, b = video.feats[same].float().flatten(1), frames.feats[frames.rows].float().flatten(1)
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) >= 0.98
    # the demo's LSTM on both: `ekx evaluate` refuses features of another source (identity), so
    # its own steps run here on the frames cache
    ckpt = ck.load_checkpoint(workdir / "runs" / "lstm-demo" / "best.pt")
    with pytest.raises(EkxError, match="source"):
        ck.check_compatible(ckpt, frames, "the demo's lstm run")
    cfg_head = TrainConfig.from_dict(ckpt["config"], "best.pt")
    model, norm = ck.model_from_checkpoint(ckpt), (ckpt["norm"]["mean"], ckpt["norm"]["std"])
    scores = {}
    for name, split in (("video", video), ("frames", frames)):
        verb, _ = predict(model, split, norm, cfg_head, cpu, resolve_precision(cfg_head.precision, cpu))
        scores[name] = reversal_scores(verb, split.verbs[split.rows], split.attrs["verb_classes"])["direction"]
    assert abs(scores["frames"] - scores["video"]) <= 8, scores  # three of its 39 segments
    assert scores["frames"] >= 90, scores


# ---------------------------------------------------------------- FFmpeg's own log (issue 32 D)


def _test_split(root: Path, videos: list[str], spans: list[tuple[str, str]]) -> Path:
    """An annotation directory with a test split: one segment per (start, stop) of each video."""
    import csv

    root.mkdir()
    rows = [[f"{v}_{i}", v.split("_")[0], v, a, a, b, 0, 0] for v in videos for i, (a, b) in enumerate(spans)]
    with open(root / epic.SPLIT_FILES["test"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.TEST_COLUMNS, *rows])
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (root / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    return root


@pytest.mark.slow
def test_ffmpeg_log_lines_are_counted_per_video_and_said_once(tmp_path, capfd):
    """A clip cut mid-GOP (remuxed from a packet that is no keyframe): decord's FFmpeg wrote its
    complaints (``[h264 @ 0x...] co located POCs unavailable`` ...) raw to the terminal, one per
    line. Now no such line reaches stderr (decoded in the watchdog's child); one line says
    how many and for which video, and `ekx cache info` shows the count recorded in the cache."""
    import re

    import av
    from test_timing import write_pts_video

    full = write_pts_video(tmp_path / "full.mp4", [round(1000 * i / 30) for i in range(90)], gop=30, bframes=2)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_pts_video(videos / "P01_02.mp4", [round(1000 * i / 30) for i in range(90)])  # a whole one
    with av.open(str(full)) as inp, av.open(str(videos / "P01_01.mp4"), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for i, p in enumerate(p for p in inp.demux(s) if p.dts is not None):
            if i >= 12:  # frames 0-11 gone: the next ones reference them
                p.stream = o
                out.mux(p)
    ann = _test_split(
        tmp_path / "ann", ["P01_01", "P01_02"], [("00:00:00.50", "00:00:01.50"), ("00:00:01.50", "00:00:02.40")]
    )
    capfd.readouterr()
    out = tmp_path / "f.h5"
    args = ["--split", "test", "--weights", "none", "--frames", "4", "--workers", "0", "--skip-errors"]
    r = cli("extract", *args, "--annotations", str(ann), "--videos", str(videos), "--out", str(out))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    said = re.search(
        r"FFmpeg logged (\d+) line\(s\) while decoding 1 video\(s\) \(most: P01_01, (\d+), e\.g\. \"", text
    )
    assert said and said.group(1) == said.group(2) and int(said.group(1)) > 0, text
    err = capfd.readouterr().err
    assert not re.search(r"\[\w+ @ 0x", err + r.output), err
    n = said.group(1)
    info = " ".join(cli("cache", "info", str(out)).output.split())
    assert f"FFmpeg log lines while decoding: {n} in 1 video(s) (P01_01 {n})" in info, info


def test_a_forked_decoder_converts_frames_after_its_parent_did(clips, tmp_path):
    """The watchdog decodes in a process forked from one that may have converted frames
    itself (PyAV's swscale): PyAV 18.1.1 hung such a child for good in its first conversion
    (pyproject.toml pins it out); the child must finish within seconds."""
    import subprocess
    import sys

    code = f"""
import os, signal, av
def convert(n):
    with av.open({str(clips / "epic55_wall_04x04_h264_720p60.mp4")!r}) as c:
        for i, f in enumerate(c.decode(video=0)):
            f.to_ndarray(format="rgb24", height=128, width=228)
            if i >= n:
                break
convert(3)
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    convert(3)
    os._exit(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the forked decoder hung (exit {out.returncode}; PyAV {out.stderr[-500:]})"
