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
times select the same frames in both. Audio is dropped.

Each video is written to `<name>.part` and renamed only once complete and checked: the
copy must hold as many frames as the source, over the same span (a source cut short, or
one whose frames do not all decode, fails instead), so no partial or short file ever
counts as done; re-running skips what is there. The `.part` is locked while written
(flock): a second run of the same video waits, then finds it done, rather than truncating
the first's file. `--verify` decodes every frame of every copy. `DST/ekx-prepare.json`
records the settings, and a cache extracted from the copy records them in its identity
(`video_input`), so it never mixes with one from the originals.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

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


@contextmanager
def _writer_lock(tmp: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``tmp`` (created if absent), the one file a video is written to:
    a second `ekx prepare` of the same video waits here instead of truncating the first's copy
    (which would leave a hole in it). The holder renames or removes ``tmp`` before letting go,
    so a waiter that then holds a file no longer at that path locks the one there now."""
    while True:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks: write as before, unguarded
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            break
        try:
            here = os.stat(tmp)
        except FileNotFoundError:
            here = None
        held = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def transcode(src: Path, dst: Path, settings: Settings) -> int | None:
    """Write the prepared copy of ``src`` to ``dst`` (via ``dst.part``, locked); returns frames
    written, or None where another process finished ``dst`` while this one waited for it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with _writer_lock(tmp):
        try:
            if dst.is_file():
                tmp.unlink()
                return None
            source, n = _encode(src, tmp, settings)
            if n == 0:
                raise EkxError(f"{src}: no video frames decoded")
            # what was written against what the source holds, before the copy gets its name
            problem = cut_short(src, source)
            if not problem and (problem := mismatch(dst, source, stream_summary(tmp))):
                problem += ": the source does not decode whole - replace it (the copy is not kept)"
            if problem:
                raise EkxError(problem)
            os.replace(tmp, dst)  # atomic: a partial output never has the final name
        except BaseException:
            tmp.unlink(missing_ok=True)  # under the lock: never another process's file
            raise
    return n


def _encode(src: Path, tmp: Path, settings: Settings) -> tuple[Summary, int]:
    """Transcode ``src`` into ``tmp``: (the source's summary, counted in the same pass, frames written)."""
    import av

    n, count, stamps = 0, 0, []  # frames written; the source's packets and their pts
    with av.open(str(src)) as inp:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        tb = vin.time_base or Fraction(1, 90000)
        start = timeline_origin(inp)
        origin = round(start / tb)  # the copy (MP4) counts time from pts 0
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
            prev = None
            for packet in inp.demux(vin):
                if packet.size:  # not the flush packet
                    count += 1
                    if packet.pts is not None:
                        stamps.append(packet.pts)
                for frame in packet.decode():
                    pts = frame.pts if frame.pts is not None else (0 if prev is None else prev + tick)
                    if prev is not None and pts <= prev:  # a repeated/garbled pts: keep the order strict
                        pts = prev + 1
                    small = frame.reformat(width=tw, height=th, format=settings.pix_fmt, interpolation="AREA")
                    small.pts, small.time_base = pts - origin, tb
                    out.mux(vout.encode(small))
                    prev, n = pts, n + 1
            out.mux(vout.encode())
        listed = vin.frames if _indexed(inp) else 0
    first, last = (float(min(stamps) * tb) - start, float(max(stamps) * tb) - start) if stamps else (math.nan,) * 2
    return Summary(count, first, last, listed), n


def _indexed(container) -> bool:
    """An MP4/MOV: its index lists every frame (a file holding fewer was cut short)."""
    return "mp4" in container.format.name


class Summary(NamedTuple):
    frames: int  # video packets in the file: one per frame
    first: float  # first and last frame time in s on the file's timeline (NaN: no times)
    last: float
    listed: int  # frames the container's index lists (MP4); 0 where it has none


def stream_summary(path: Path) -> Summary:
    """The video stream's frames and time span from the container, without decoding."""
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
        listed = s.frames if _indexed(c) else 0
    return Summary(count, min(times, default=math.nan), max(times, default=math.nan), listed)


def cut_short(src: Path, a: Summary) -> str | None:
    """Why the source (summary ``a``) holds fewer frames than its index lists, or None."""
    if a.listed and a.frames < a.listed:
        return (
            f"{src}: the index lists {a.listed} frames, the file holds {a.frames}: the source was cut "
            "short (an interrupted copy?) - replace it with a whole one"
        )
    return None


def mismatch(dst: Path, a: Summary, b: Summary) -> str | None:
    """Why ``dst`` (summary ``b``) does not have the source's (``a``) frames and span, or None."""
    if a.frames != b.frames:
        return f"{dst}: {b.frames} frames, the source has {a.frames}"
    if not math.isnan(a.first) and (abs(a.first - b.first) > 1e-3 or abs(a.last - b.last) > 1e-3):
        return f"{dst}: frames span {b.first:.3f}-{b.last:.3f} s, the source {a.first:.3f}-{a.last:.3f} s"
    return None


def decode_summary(path: Path) -> Summary:
    """The frames of ``path`` by decoding every one of them, any damage an error (a hole of
    zeros in the data keeps every packet's size and time: only the decoder sees it)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.codec_context.options = {"err_detect": "explode"}  # a concealed error is still an error
        origin = timeline_origin(c)
        count, times = 0, []
        for packet in c.demux(s):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                raise ValueError(f"decode error after frame {count} ({e.strerror})") from None
            for f in frames:
                count += 1
                if f.time is not None:
                    times.append(f.time - origin)
        listed = s.frames if _indexed(c) else 0
    return Summary(count, min(times, default=math.nan), max(times, default=math.nan), listed)


def verify(src: Path, dst: Path) -> str | None:
    """None when the copy decodes whole, with the source's frame count and time span, else the problem."""
    if not dst.is_file():
        return f"{dst}: missing"
    redo = "delete it and re-run ekx prepare"
    try:
        a = stream_summary(src)
    except Exception as e:
        return f"{src}: the source is unreadable ({type(e).__name__}); replace it"
    try:
        b = decode_summary(dst)
    except Exception as e:
        return f"{dst}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}): truncated or damaged - {redo}"
    if problem := mismatch(dst, a, b):
        return f"{problem} (truncated or damaged: {redo})"
    return cut_short(src, a)


def verify_many(pairs: list[tuple[Path, Path]], workers: int = 1) -> list[str]:
    """`verify` of every (source, copy) pair, ``workers`` at a time (it decodes each copy whole): the problems."""
    if workers <= 1 or len(pairs) <= 1:
        found = [verify(a, b) for a, b in pairs]
    else:
        with ProcessPoolExecutor(min(workers, len(pairs)), initializer=_worker_init) as pool:
            found = list(pool.map(verify, *zip(*pairs, strict=True)))
    return [p for p in found if p]


def _prepare_one(job: tuple[str, str, dict]) -> Outcome:
    import time

    src, dst, settings = Path(job[0]), Path(job[1]), Settings(**job[2])
    t0 = time.perf_counter()
    try:
        n = transcode(src, dst, settings)
    except EkxError as e:
        return Outcome(src, dst, "failed", error=str(e).removeprefix(f"{src}: "))
    except Exception as e:
        return Outcome(src, dst, "failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if n is None:  # another run wrote it while this one waited
        return Outcome(src, dst, "skipped")
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
