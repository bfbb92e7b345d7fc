"""`ekx prepare SRC DST`: a training copy of the videos, made once.

EPIC-100 is 1080p at 50/60 fps with keyframes seconds apart: decoding it costs ~2.6 h of
CPU per pass on a 16-core node, paid again by every backbone and every fine-tuning
epoch. The copy is H.264 at a short side that serves every registered backbone's
preprocessing (the largest resize among them, 320 px for EfficientNet-B3: nothing is
ever upsampled later), with a keyframe every ~0.5 s and no B-frames, so sparse segment
sampling seeks cheaply and every frame decodes on its own GOP.

Frame identity is kept: one output frame per input frame, each at the input's own time
on its file's timeline (pts copied, minus the timeline's origin for MPEG-PS/TS inputs,
the stream's time base kept; `ekx.extract.video.timeline_origin`), so a variable-frame-rate
video stays variable, a stream starting after the file's 0 still does, and `start`/`stop`
times select the same frames in both. Audio is
dropped. Each video is written to `<name>.part` and renamed when complete, so an
interrupted run never leaves a partial file that counts as done; re-running skips what
is there. `DST/ekx-prepare.json` records the settings, and a cache extracted from the
copy records them in its identity (`video_input`), so it never mixes with one from the
originals.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from ekx import EkxError, epic
from ekx.extract.video import timeline_origin

MANIFEST = "ekx-prepare.json"
FORMAT = "ekx-prepared-videos"


@dataclass(frozen=True)
class Settings:
    short_side: int = 320  # the largest resize of the registered backbones (EfficientNet-B3)
    keyframe_seconds: float = 0.5
    crf: int = 23  # x264's default: visually transparent at this size, ~1 GB per hour of EPIC
    preset: str = "veryfast"
    codec: str = "libx264"
    pix_fmt: str = "yuv420p"

    def describe(self) -> str:
        """The identity string a cache records for input read from such a copy."""
        return (
            f"prepared copy: {self.codec} {self.pix_fmt} crf {self.crf} preset {self.preset}, "
            f"short side {self.short_side}, keyframe every {self.keyframe_seconds:g} s, no B-frames"
        )


@dataclass
class Outcome:
    src: Path
    dst: Path
    status: str  # done | skipped | failed
    frames: int = 0
    seconds: float = 0.0
    error: str = ""


def default_short_side() -> int:
    """The largest short-side resize among the registered backbones' preprocessing."""
    from ekx.extract import backbones

    return max(min(bb.preprocess.resize_size) for bb in backbones.REGISTRY.values())


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side at ``short_side`` (never upscaled), both even (yuv420p)."""
    short = min(width, height)
    scale = min(1.0, short_side / short)

    def even(x: float) -> int:
        return max(2, round(x / 2) * 2)

    return even(width * scale), even(height * scale)


# ---------------------------------------------------------------- one video


def transcode(src: Path, dst: Path, settings: Settings) -> int:
    """Write the prepared copy of ``src`` to ``dst`` (via ``dst.part``); returns frames written."""
    import av

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    n = 0
    with av.open(str(src)) as inp:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        tb = vin.time_base or Fraction(1, 90000)
        origin = round(timeline_origin(inp) / tb)  # the copy (MP4) counts time from pts 0
        rate = vin.average_rate or vin.guessed_rate or Fraction(30)
        tw, th = target_size(vin.codec_context.width, vin.codec_context.height, settings.short_side)
        gop = max(1, round(float(rate) * settings.keyframe_seconds))
        tick = max(1, round(1 / (float(rate) * tb)))  # pts step where a frame carries none
        with av.open(str(tmp), "w", format="mp4") as out:
            vout = out.add_stream(settings.codec, rate=rate)
            assert isinstance(vout, av.video.stream.VideoStream)
            vout.width, vout.height, vout.pix_fmt = tw, th, settings.pix_fmt
            vout.time_base = tb
            vout.codec_context.time_base = tb
            # fixed GOP (no scene-cut keyframes) and no B-frames: decode order = display order
            vout.options = {
                "preset": settings.preset,
                "crf": str(settings.crf),
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",
                "bf": "0",
            }
            last = None
            for frame in inp.decode(vin):
                pts = frame.pts if frame.pts is not None else (0 if last is None else last + tick)
                if last is not None and pts <= last:  # a repeated/garbled pts: keep the order strict
                    pts = last + 1
                small = frame.reformat(width=tw, height=th, format=settings.pix_fmt, interpolation="AREA")
                small.pts, small.time_base = pts - origin, tb
                out.mux(vout.encode(small))
                last, n = pts, n + 1
            out.mux(vout.encode())
    if n == 0:
        tmp.unlink(missing_ok=True)
        raise EkxError(f"{src}: no video frames decoded")
    os.replace(tmp, dst)  # atomic: a partial output never has the final name
    return n


def stream_summary(path: Path) -> tuple[int, float, float]:
    """(video packets, first and last time in s on the file's timeline) from the container,
    without decoding."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        tb = float(s.time_base or 0)
        origin = timeline_origin(c)
        count, times = 0, []
        for p in c.demux(s):
            if p.size == 0:  # the flush packet
                continue
            count += 1
            if p.pts is not None:
                times.append(p.pts * tb - origin)
    if not times:
        return count, 0.0, 0.0
    return count, min(times), max(times)


def verify(src: Path, dst: Path) -> str | None:
    """None when the copy has the source's frame count and time span, else the problem."""
    if not dst.is_file():
        return f"{dst}: missing"
    try:
        a, b = stream_summary(src), stream_summary(dst)
    except Exception as e:
        return f"{dst}: unreadable ({type(e).__name__}): truncated or damaged - delete it and re-run ekx prepare"
    if a[0] != b[0]:
        return f"{dst}: {b[0]} frames, the source has {a[0]} (truncated or damaged: delete it and re-run prepare)"
    if abs(a[1] - b[1]) > 1e-3 or abs(a[2] - b[2]) > 1e-3:
        return f"{dst}: frames span {b[1]:.3f}-{b[2]:.3f} s, the source {a[1]:.3f}-{a[2]:.3f} s"
    return None


def _prepare_one(job: tuple[str, str, dict]) -> Outcome:
    import time

    src, dst, settings = Path(job[0]), Path(job[1]), Settings(**job[2])
    t0 = time.perf_counter()
    try:
        n = transcode(src, dst, settings)
    except Exception as e:
        Path(str(dst) + ".part").unlink(missing_ok=True)
        return Outcome(src, dst, "failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return Outcome(src, dst, "done", n, time.perf_counter() - t0)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:  # Linux: die with the parent, even when it is SIGKILLed
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- a whole tree


def videos_to_prepare(src: Path, annotations: Path | None = None, split: str | None = None) -> list[Path]:
    """Every video under ``src`` (sorted), or only those a split's annotation file names."""
    if not src.is_dir():
        raise EkxError(f"{src}: no such video directory")
    index = epic.index_videos(src)
    if split:
        if annotations is None:
            raise EkxError("--split needs the annotation directory (--annotations or ekx config)")
        segments = epic.Annotations(annotations).segments(split)
        found, missing = epic.locate_videos(segments, src)
        if missing:
            raise EkxError(epic.missing_videos_message(missing, len(found) + len(missing), src))
        return sorted(found.values())
    return sorted(index.values())


def check_manifest(dst: Path, settings: Settings) -> None:
    """Write DST's manifest, or refuse to add videos made with other settings to it."""
    path = dst / MANIFEST
    want = {"format": FORMAT, "version": 1, **asdict(settings)}
    if path.is_file():
        have = json.loads(path.read_text())
        diff = [f"{k}: {have.get(k)!r} there, {v!r} asked" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise EkxError(
                f"{path}: this copy was made with other settings ({'; '.join(diff)}); "
                "choose another DST or the same settings"
            )
        return
    dst.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(want, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(videos: Path) -> Settings | None:
    """The settings of a prepared copy at ``videos``, or None for original videos."""
    path = Path(videos) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise EkxError(f"{path}: not an ekx prepare manifest")
    return Settings(**{k: data[k] for k in Settings.__dataclass_fields__ if k in data})


def prepare(
    src: Path,
    dst: Path,
    settings: Settings,
    videos: list[Path],
    workers: int = 2,
    shard: tuple[int, int] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Transcode ``videos`` (under ``src``) into ``dst``, same relative paths; resumable."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise EkxError(f"DST {dst} lies inside SRC {src}: choose a folder outside the originals")
    if shard:
        videos = videos[shard[0] :: shard[1]]
    check_manifest(dst, settings)
    jobs, outcomes = [], []
    for v in videos:
        out = dst / Path(v).resolve().relative_to(src)
        if out.is_file():  # complete: only a finished transcode gets the final name
            outcomes.append(Outcome(Path(v), out, "skipped"))
        else:
            jobs.append((str(v), str(out), asdict(settings)))
    if on_start:
        on_start(len(videos), len(outcomes))
    if not jobs:
        return outcomes
    if workers <= 1:
        for job in jobs:
            outcomes.append(o := _prepare_one(job))
            if on_done:
                on_done(o)
        return outcomes
    with ProcessPoolExecutor(min(workers, len(jobs)), initializer=_worker_init) as pool:
        futures = [pool.submit(_prepare_one, job) for job in jobs]
        for f in as_completed(futures):
            outcomes.append(o := f.result())
            if on_done:
                on_done(o)
    return outcomes
