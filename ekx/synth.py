"""A synthetic dataset in the official EPIC-100 formats, learnable in a way that tests
the whole pipeline.

- Nouns are object appearance: shape x colour (12 classes).
- Verbs are what happens over time. Three pairs are exact time-reversals of each
  other (open/close: the object grows/shrinks; turn-on/turn-off: it brightens/darkens;
  put/take: the object count goes 1->3 / 3->1), so an order-blind head (average
  pooling) is at chance between the two verbs of a pair while an order-aware head is
  not. Each change alters a global-average-pooled CNN feature (area, brightness,
  count), not position alone. Two more verbs: shake (size oscillates), hold (static).
- Both verbs of a pair allow the same nouns, so the noun never gives the direction
  away; pairs differ in which nouns they allow (structured co-occurrence).
- Segment lengths 0.5-6 s, gaps between segments, videos alternate 30 and 60 fps.
- Every frame carries its own index as a 16-bit barcode in a thin top band, so tests
  can check that decoding returns the frames it claims (`read_stamp`).
- With ``context=True``, a pair that only the video around a segment tells apart
  (`CONTEXT_PAIR`, class category "context"): rinse and wipe look the same inside the
  segment (a static object, as hold; one noun, place and length for all of them, so no
  segment of the pair can be told from another by what is inside it), and differ in the
  second before it - a white band
  across the frame's lower third before a rinse, nothing before a wipe. A segment-only
  head is at chance between them; a head that sees the window around the segment is not.
- Every video carries a sound track (16-bit PCM, mono, 48 kHz, interleaved in the same
  MP4; it changes no frame; `ekx.synth_sound`): low noise, and inside each segment a sound decided by its labels
  (`segment_sound`) - the noun sets the pitch (colour) and timbre (shape), the verb what
  happens over time, as it does on screen: open/close a rising/falling pitch, turn-on/off a
  rising/falling loudness, put/take one/three beeps, shake a tremolo, hold a steady tone. The
  time-reversed pairs sound time-reversed too, so sound tells nothing the frames do not.
- With ``audio_pair=True``, a pair that only the sound tells apart (`AUDIO_PAIR`, class
  category "sound"): pour and stir look identical (a static object, smaller than hold's)
  and sound different - running water (noise) for pour, a spoon's clicks for stir. A
  visual-only head is at chance between them; a head that hears the segment is not.
"""

from __future__ import annotations

import csv
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ekx import epic
from ekx.synth_sound import SOUND_RATE, SoundTrack, render_sound, segment_sound  # noqa: F401

VERBS = ("open", "close", "turn-on", "turn-off", "put", "take", "shake", "hold")
REVERSED_PAIRS = (("open", "close"), ("turn-on", "turn-off"), ("put", "take"))
CONTEXT_PAIR = ("rinse", "wipe")  # told apart only by the second before the segment (cue: rinse)
AUDIO_PAIR = ("pour", "stir")  # look the same, told apart by their sound only
ALL_VERBS = VERBS + CONTEXT_PAIR + AUDIO_PAIR
CUE_SECONDS = 1.0  # the cue shows during this long before a rinse segment
CUE_GAP = 1.3  # at least this gap before a context-pair segment, so the cue never overlaps one
PAIR_LENGTH = 2.0  # seconds: every context-pair segment is the same inside
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 210, 40)}
NOUNS = tuple(f"{shape}:{colour}" for shape in SHAPES for colour in COLOURS)
STAMP_BITS = 16


@dataclass
class SynthConfig:
    videos: int = 16
    segments: int = 20  # per video
    width: int = 256
    height: int = 192
    fps: tuple[int, ...] = (30, 60)  # cycled over videos
    min_length: float = 0.5
    max_length: float = 6.0
    seed: int = 0
    participants: int = 4
    workers: int = 2
    crf: int = 18
    context: bool = False  # add CONTEXT_PAIR (a task that needs the video around the segment)
    audio_pair: bool = False  # add AUDIO_PAIR (a task that needs the sound)
    sound: bool = True  # a sound track in every video

    @property
    def verbs(self) -> tuple[str, ...]:
        return VERBS + (CONTEXT_PAIR if self.context else ()) + (AUDIO_PAIR if self.audio_pair else ())


@dataclass
class _Segment:
    narration_id: str
    start: float
    stop: float
    verb: int
    noun: int
    cx: float = 0.5
    cy: float = 0.55
    cue: bool = False  # a white band shows during the CUE_SECONDS before it (rinse)


@dataclass
class _Video:
    video_id: str
    participant_id: str
    fps: int
    duration: float
    seed: int
    segments: list[_Segment] = field(default_factory=list)
    verbs: tuple[str, ...] = VERBS  # the names of the segments' verb classes


def allowed_nouns(seed: int, verbs: tuple[str, ...] = VERBS) -> np.ndarray:
    """[verbs, nouns] bool mask; the two verbs of a time-reversed pair share a row."""
    rng = np.random.default_rng([seed, 1])
    groups = {v: i // 2 for i, v in enumerate(verbs)}  # consecutive verbs form pairs
    rows = []
    for _ in range(max(groups.values()) + 1):
        row = np.zeros(len(NOUNS), bool)
        row[rng.choice(len(NOUNS), size=8, replace=False)] = True
        rows.append(row)
    return np.stack([rows[groups[v]] for v in verbs])


def plan(cfg: SynthConfig) -> list[_Video]:
    """Decide every video, segment, label and time; deterministic for cfg.seed."""
    rng = np.random.default_rng(cfg.seed)
    mask = allowed_nouns(cfg.seed, cfg.verbs)
    videos = []
    participants = _participants(cfg)
    for i in range(cfg.videos):
        pid = f"P{i % participants + 1:02d}"
        vid = f"{pid}_{i // participants + 1:02d}"
        t = round(float(rng.uniform(0.3, 1.0)), 2)
        segs: list[_Segment] = []
        for j in range(cfg.segments):
            length = round(float(rng.uniform(cfg.min_length, cfg.max_length)), 2)
            verb = int(rng.integers(len(cfg.verbs)))
            noun = int(rng.choice(np.flatnonzero(mask[verb])))
            cx, cy = float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.45, 0.6))
            if cfg.verbs[verb] in CONTEXT_PAIR:
                # identical inside the segment (one object, place and length), so only the
                # second before it tells the pair apart; room for the cue after the previous one
                length, noun, cx, cy = PAIR_LENGTH, int(np.flatnonzero(mask[verb])[0]), 0.5, 0.55
                t = round(max(t, (segs[-1].stop if segs else 0.0) + CUE_GAP), 2)
            segs.append(
                _Segment(
                    f"{vid}_{j}",
                    t,
                    round(t + length, 2),
                    verb,
                    noun,
                    cx,
                    cy,
                    cue=cfg.verbs[verb] == CONTEXT_PAIR[0],
                )
            )
            t = round(t + length + float(rng.uniform(0.2, 1.0)), 2)
        # cycle frame rates so that every participant has videos at each rate
        fps = cfg.fps[(i + i // participants) % len(cfg.fps)]
        videos.append(_Video(vid, pid, fps, t, cfg.seed * 1000 + i, segs, cfg.verbs))
    return videos


def _participants(cfg: SynthConfig) -> int:
    # at least two, so that train and validation are both non-empty
    return max(2, min(cfg.participants, cfg.videos))


def validation_videos(videos: list[_Video], cfg: SynthConfig) -> set[str]:
    """All videos of the last participant (unseen in train) plus one more seen video."""
    last = f"P{_participants(cfg):02d}"
    val = {v.video_id for v in videos if v.participant_id == last}
    seen = [v.video_id for v in videos if v.participant_id != last]
    if len(seen) >= 6:
        val.add(seen[-1])
    return val


# ---------------------------------------------------------------- rendering


def _state(verb: str, p: float) -> tuple[float, float, int]:
    """(scale, brightness, count) of the object at progress p in [0, 1]."""
    scale, bright, count = 0.75, 1.0, 1
    if verb == "open":
        scale = 0.4 + 0.6 * p
    elif verb == "close":
        scale = 1.0 - 0.6 * p
    elif verb == "turn-on":
        bright = 0.2 + 0.8 * p
    elif verb == "turn-off":
        bright = 1.0 - 0.8 * p
    elif verb in ("put", "take"):
        k = min(int(3 * p), 2)
        scale, count = 0.5, 1 + (k if verb == "put" else 2 - k)
    elif verb == "shake":
        scale = 0.72 + 0.25 * math.sin(2 * math.pi * 3 * p)
    elif verb in AUDIO_PAIR:  # identical on screen: only the sound tells them apart
        scale = 0.6
    return scale, bright, count


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return xx * xx + yy * yy <= r * r
    if shape == "square":
        return (np.abs(xx) <= 0.85 * r) & (np.abs(yy) <= 0.85 * r)
    # triangle pointing up, apex at -r, base at +r
    return (yy >= -r) & (yy <= r) & (np.abs(xx) <= (yy + r) * 0.6)


def stamp_height(height: int) -> int:
    return max(6, height // 24)


def _stamp(frame: np.ndarray, index: int) -> None:
    h, w = stamp_height(frame.shape[0]), frame.shape[1]
    bw = w // STAMP_BITS
    for b in range(STAMP_BITS):
        frame[:h, b * bw : (b + 1) * bw] = 255 if (index >> b) & 1 else 0


def read_stamp(frame: np.ndarray) -> int:
    """The frame index a synthetic frame carries (robust to compression noise)."""
    h, w = stamp_height(frame.shape[0]), frame.shape[1]
    bw = w // STAMP_BITS
    band = frame[1 : h - 1].astype(np.float32).mean(axis=(0, 2) if frame.ndim == 3 else 0)  # colour or grey
    bits = [band[b * bw + 2 : (b + 1) * bw - 2].mean() > 127 for b in range(STAMP_BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def render_frame(video: _Video, index: int, width: int, height: int, background: np.ndarray) -> np.ndarray:
    frame = background.copy()
    t = index / video.fps
    seg = next((s for s in video.segments if s.start <= t < s.stop), None)
    if seg is None and any(s.cue and s.start - CUE_SECONDS <= t < s.start for s in video.segments):
        frame[2 * height // 3 :] = 245  # the cue before a rinse
    if seg is not None:
        p = (t - seg.start) / (seg.stop - seg.start)
        scale, bright, count = _state(video.verbs[seg.verb], p)
        shape, colour = NOUNS[seg.noun].split(":")
        rgb = np.array(COLOURS[colour], np.float32) * bright
        r = 0.3 * height * scale
        for k in range(count):
            cx = seg.cx * width + (k - (count - 1) / 2) * 2.3 * r
            cy = seg.cy * height
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, width)
            y0, y1 = max(int(cy - r) - 1, stamp_height(height)), min(int(cy + r) + 2, height)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            m = _shape_mask(shape, yy - cy, xx - cx, r)
            frame[y0:y1, x0:x1][m] = rgb.astype(np.uint8)
    _stamp(frame, index)
    return frame


def _background(width: int, height: int) -> np.ndarray:
    # a faint static gradient so the frame is not perfectly flat
    g = np.linspace(35, 75, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to(g, (height, width, 3)).astype(np.uint8).copy()


def write_video(
    video: _Video,
    path: Path,
    width: int,
    height: int,
    crf: int = 18,
    sound: np.ndarray | None = None,
    codec: str = "pcm_s16le",
) -> int:
    """Encode one video as H.264 mp4 with PyAV, with ``sound`` (float32 mono at SOUND_RATE)
    as its sound track (`SoundTrack`: ``codec`` pcm_s16le or aac), interleaved; returns the
    number of frames."""
    import av  # the test extra; only synth needs an encoder

    path.parent.mkdir(parents=True, exist_ok=True)
    n = round(video.duration * video.fps)
    bg = _background(width, height)
    tmp = path.with_name(path.name + ".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=video.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf), "g": str(video.fps)}
        track = SoundTrack(container, sound, codec) if sound is not None else None
        for i in range(n):
            img = av.VideoFrame.from_ndarray(render_frame(video, i, width, height, bg), format="rgb24")
            container.mux(stream.encode(img))
            if track is not None:  # the sound up to this frame's end, so the file interleaves
                track.write_until((i + 1) / video.fps)
        container.mux(stream.encode())
        if track is not None:
            track.finish()
    tmp.replace(path)  # atomic: an interrupted synth never leaves a half video behind
    return n


# ---------------------------------------------------------------- CSVs


def _write_csv(path: Path, header, rows) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _annotation_rows(video: _Video, labelled: bool):
    for s in video.segments:
        verb, noun = video.verbs[s.verb], NOUNS[s.noun]
        start = epic.format_timestamp(s.start)
        # narration_timestamp has millisecond precision in the official files
        row = [
            s.narration_id,
            video.participant_id,
            video.video_id,
            start + "0",
            start,
            epic.format_timestamp(s.stop),
            # official naming: JPEG N (from 1) is frame N-1, shown from (N-1)/fps; the segment's
            # frames are the one shown at its start to the last one shown before its stop
            math.floor(s.start * video.fps + 1e-9) + 1,
            max(math.ceil(s.stop * video.fps - 1e-9), math.floor(s.start * video.fps + 1e-9) + 1),
        ]
        if labelled:
            row += [f"{verb} {noun}", verb, s.verb, noun, s.noun, f"['{noun}']", f"[{s.noun}]"]
        yield row


def write_annotations(videos: list[_Video], cfg: SynthConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    val = validation_videos(videos, cfg)
    train_v = [v for v in videos if v.video_id not in val]
    val_v = [v for v in videos if v.video_id in val]
    for name, vids, labelled in (("train", train_v, True), ("validation", val_v, True), ("test", val_v, False)):
        rows = [r for v in vids for r in _annotation_rows(v, labelled)]
        cols = epic.LABELLED_COLUMNS if labelled else epic.TEST_COLUMNS
        _write_csv(out / epic.SPLIT_FILES[name], cols, rows)
    _write_csv(
        out / epic.VERB_CLASSES,
        epic.CLASS_COLUMNS,
        [[i, v, f"['{v}']", _category(v)] for i, v in enumerate(cfg.verbs)],
    )
    _write_csv(
        out / epic.NOUN_CLASSES, epic.CLASS_COLUMNS, [[i, n, f"['{n}']", n.split(":")[0]] for i, n in enumerate(NOUNS)]
    )
    _write_csv(
        out / "EPIC_100_video_info.csv",
        ("video_id", "duration", "fps", "resolution"),
        [[v.video_id, f"{v.duration:.3f}", v.fps, f"{cfg.width}x{cfg.height}"] for v in videos],
    )
    # Tail classes: those rarer than the median in train, as a stand-in for EPIC's long tail.
    for fname, col, n, attr in (
        (epic.TAIL_VERBS, "verb", len(cfg.verbs), "verb"),
        (epic.TAIL_NOUNS, "noun", len(NOUNS), "noun"),
    ):
        counts = np.bincount([getattr(s, attr) for v in train_v for s in v.segments], minlength=n)
        _write_csv(out / fname, (col,), [[c] for c in np.flatnonzero(counts < np.median(counts))])
    unseen = sorted({v.participant_id for v in val_v} - {v.participant_id for v in train_v})
    _write_csv(out / epic.UNSEEN.format(split="validation"), ("participant_id",), [[p] for p in unseen])


def _category(verb: str) -> str:
    if any(verb in p for p in REVERSED_PAIRS):
        return "reversible"
    return "context" if verb in CONTEXT_PAIR else "sound" if verb in AUDIO_PAIR else "other"


def _encode_job(args) -> int:
    video, path, width, height, crf, sound = args
    return write_video(video, path, width, height, crf, render_sound(video, NOUNS) if sound else None)


def synthesize(out: Path, cfg: SynthConfig, progress=None) -> dict:
    """Write ``out/annotations/`` and ``out/videos/<pid>/videos/<vid>.MP4``; returns a summary."""
    out = Path(out)
    videos = plan(cfg)
    write_annotations(videos, cfg, out / "annotations")
    size = (cfg.width, cfg.height, cfg.crf, cfg.sound)
    jobs = [(v, out / "videos" / v.participant_id / "videos" / f"{v.video_id}.MP4", *size) for v in videos]
    frames = 0
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for n in pool.map(_encode_job, jobs):
            frames += n
            if progress:
                progress()
    return {
        "videos": len(videos),
        "segments": sum(len(v.segments) for v in videos),
        "frames": frames,
        "annotations": out / "annotations",
        "video_root": out / "videos",
    }
