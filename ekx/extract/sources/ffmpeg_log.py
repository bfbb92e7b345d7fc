"""FFmpeg's own log lines while a video decodes: counted per video and said in one line,
never printed raw.

decord's and torchcodec's FFmpeg writes lines such as ``[h264 @ 0x55d0c8a4e2c0] error while
decoding MB 3 7, bytestream -5`` straight to the process's stderr from C (110 of them for one
clip cut mid-GOP), past Python. `captured` wraps one video's decode where it runs (the
decoding worker, or the watchdog's child): for each step of it, file descriptor 2 points at
an unlinked temporary file; afterwards the lines in FFmpeg's ``[name @ 0x...]`` form are
counted (the first kept, without its address) and anything else is passed on to the real
stderr unchanged. PyAV's FFmpeg logs through PyAV instead (off by default), so for the same
step its messages are captured there. Each Result carries the video's count so far; the
extraction adds them up per video (`DecoderLog`), says them in one line and records them in
the cache (``decoder_log``, shown by `ekx cache info`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ekx.extract.video import Result

FFMPEG_LINE = re.compile(rb"^\[[^\]\s]+ @ 0x[0-9a-fA-F]+\] ?(.*)$")
ATTR = "decoder_log"  # the cache's root attribute: {video id: [lines, first line]}


@contextmanager
def _pyav_capture(logs: list):
    """PyAV's FFmpeg messages (warnings and worse) into ``logs`` for the duration, from any
    thread (a decoder's own threads log too)."""
    try:
        import av.logging as avlog
    except ImportError:  # pragma: no cover - PyAV is a dependency
        yield
        return
    level = avlog.get_level()
    avlog.set_level(avlog.WARNING)
    try:
        with avlog.Capture(local=False) as got:
            yield
        logs.extend(got)
    finally:
        avlog.set_level(level)


def _drain(tmp, real_fd: int, tally: list) -> None:
    """Count FFmpeg's lines in ``tmp``, pass the rest to ``real_fd``, empty ``tmp``."""
    tmp.seek(0)
    data = tmp.read()
    tmp.seek(0)
    tmp.truncate()
    other = bytearray()
    for line in data.splitlines(keepends=True):
        m = FFMPEG_LINE.match(line.rstrip(b"\r\n"))
        if m:
            tally[0] += 1
            tally[1] = tally[1] or m.group(1).decode("utf-8", "replace").strip()
        else:
            other += line
    if other:
        os.write(real_fd, bytes(other))


def captured(decode: Callable[[], Iterator[Result]]) -> Iterator[Result]:
    """``decode()``'s Results, each with the FFmpeg log lines of this video so far."""
    tally: list = [0, ""]  # lines, the first one
    it = decode()
    try:
        real = os.dup(2)
    except OSError:  # no stderr to redirect: nothing reaches a terminal anyway
        yield from it
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            while True:
                logs: list = []
                sys.stderr.flush()
                os.dup2(tmp.fileno(), 2)
                try:
                    with _pyav_capture(logs):
                        res = next(it, None)
                finally:
                    sys.stderr.flush()
                    os.dup2(real, 2)
                _drain(tmp, real, tally)
                for _, _, message in logs:
                    tally[0] += 1
                    tally[1] = tally[1] or message.strip()
                if res is None:
                    return
                yield replace(res, decoder_log=tally[0], decoder_note=tally[1])
    finally:
        os.close(real)


class DecoderLog:
    """Per video: the FFmpeg log lines its decode wrote (Results carry running counts)."""

    def __init__(self) -> None:
        self.videos: dict[str, list] = {}

    def add(self, video_id: str, res: Result) -> None:
        if res.decoder_log:
            seen = self.videos.setdefault(video_id, [0, ""])
            seen[0] = max(seen[0], res.decoder_log)
            seen[1] = seen[1] or res.decoder_note

    def line(self) -> str | None:
        """The one line saying it, or None where FFmpeg said nothing."""
        if not self.videos:
            return None
        total = sum(n for n, _ in self.videos.values())
        vid, (n, note) = max(self.videos.items(), key=lambda kv: kv[1][0])
        return (
            f"FFmpeg logged {total} line(s) while decoding {len(self.videos)} video(s) (most: {vid}, {n}, "
            f'e.g. "{note}"): their frames may be damaged (a file cut mid-GOP, a broken copy); '
            "the counts are in `ekx cache info`"
        )

    def finish(self, caches: list[Path], say: Callable[[str], None]) -> None:
        """After an extraction: its line said, its counts recorded in each cache."""
        if line := self.line():
            say(line)
        for path in caches:
            self.record(path)

    def record(self, path: Path) -> None:
        """Add this run's counts to the cache's ``decoder_log`` attribute (provenance, not
        identity). Never raises: a note must not fail an extraction whose rows are written."""
        if not self.videos:
            return
        try:
            import h5py

            with h5py.File(path, "r+") as f:
                old = json.loads(str(f.attrs.get(ATTR, "{}")))
                for vid, (n, note) in self.videos.items():
                    was = old.get(vid, [0, ""])
                    old[vid] = [int(was[0]) + n, was[1] or note]
                f.attrs[ATTR] = json.dumps(old, sort_keys=True)
        except Exception:
            pass


def summary(attrs: dict) -> str | None:
    """`ekx cache info`'s line for a cache's ``decoder_log``, or None."""
    try:
        videos = json.loads(str(attrs.get(ATTR, "") or "{}"))
    except ValueError:
        return None
    if not videos:
        return None
    total = sum(int(v[0]) for v in videos.values())
    shown = ", ".join(f"{k} {int(v[0])}" for k, v in sorted(videos.items(), key=lambda kv: -int(kv[1][0]))[:5])
    more = f" and {len(videos) - 5} more" if len(videos) > 5 else ""
    return f"FFmpeg log lines while decoding: {total} in {len(videos)} video(s) ({shown}{more})"
