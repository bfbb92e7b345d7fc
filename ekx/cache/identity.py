"""The one identity of a cache: what its stored features mean.

Every root attribute of a cache is part of its identity **unless it is named below** as
one that may differ: a new attribute (a backbone family's pooling, a dense store's rate)
is then checked by every consumer - extract resume, `cache merge`, stage 2 (train,
evaluate, sweep, search), checkpoints, `finetune --init-head` - without touching them.

Three views of the same attributes:

- `identity(attrs)`: what one stored feature means. Two caches whose identities are equal
  may be paired (train and validation), and a head trained on one may be evaluated on
  the other.
- `extraction(attrs)`: the identity plus which segments the file holds and how its extra
  views were drawn: equal within one extraction (a resumed run, the shards of a merge).
- `input_attrs(...)`: the attributes that say how frames become model inputs; stage 1
  writes them into every cache and `ekx finetune` computes them for its own input, so a
  warm-started head is checked against the input it will now see.

A refusal names each field and both values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# where and with which library versions a file was made, and descriptions of fields that
# are themselves in the identity: provenance, never meaning
PROVENANCE = frozenset(
    {
        "format_version",  # a newer format stores the same features (checksums, more datasets)
        "file_checksum",  # the crc32 of the file's own data (backbone_state/): integrity, not meaning
        "ekx_version",
        "torch_version",
        "torchvision_version",
        "decord_version",  # the decoder that read the frames is `decoder` (library + version)
        "device",  # the precision used is `precision`
        "weights_path",  # where a weights file lay; its sha256 is `weights`
        "resize_method",  # the words for `resize` + `decode_size`
        "source_path",  # where imported features lay; their sha256 is `source_sha256`
        "describe",  # an imported store's description, in the user's words
        "decoder_log",  # FFmpeg's log lines per video while decoding (sources.ffmpeg_log): a note
    }
)
# which segments a file holds: the train and validation caches of one model differ here
# (a dense store: which part of each video it covers, and in stage 2 the largest gap between a
# segment's sampled time and the dense time read for it, which depends on the segments)
PLAN = frozenset(
    {
        "split",
        "annotation_file",
        "annotation_sha256",
        "annotation_path",
        "shard",
        "merged_from",
        "dense_span",
        "dense_max_gap",
        "source_sha256",  # an imported store's source files: each split's are others
    }
)
# how many augmented copies a row holds and how they were drawn: view 0 is always the clean
# one, so a validation cache of view 0 only pairs with a training cache of several views
VIEWS = frozenset({"views", "augmentation"})
# the plan fields that differ between the parts of one extraction (shards and their merge)
SHARDING = frozenset({"shard", "merged_from"})

# what a cache written before a field existed implicitly holds
ORIGINAL_VIDEOS = "original videos"
OWN_SIZE = "this backbone's resize size (decoder's scaler)"
FULL_FRAMES = "full-size frames (the weights' own resize)"
DEFAULTS: dict[str, Any] = {
    "video_input": ORIGINAL_VIDEOS,
    "source": "decord",
    "decode_device": "cpu",
    "resize": "decoder",
    "bn_calibration": "",
}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def normalised(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Plain Python values, with what an older cache implicitly holds filled in."""
    out = {k: _plain(v) for k, v in attrs.items()}
    for k, v in DEFAULTS.items():
        out.setdefault(k, v)
    if "decoder" not in out and "decord_version" in out:  # made before frame sources existed
        out["decoder"] = f"decord {out['decord_version']}"
    if "decode_size" not in out:  # made before the decode path was recorded
        out["decode_size"] = OWN_SIZE if out["resize"] == "decoder" else FULL_FRAMES
    return out


def identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a stored feature means: every attribute but provenance, plan and views. The
    seed counts only for random weights, where it *is* the network (with pretrained weights
    it only draws the augmented views)."""
    a = normalised(attrs)
    out = {k: v for k, v in a.items() if k not in PROVENANCE | PLAN | VIEWS}
    if out.get("weights") != "none":
        out.pop("seed", None)
    return out


def extraction(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The identity plus the plan and views: equal for every part of one extraction."""
    a = normalised(attrs)
    return {k: v for k, v in a.items() if k not in PROVENANCE | SHARDING}


def mismatch(have: Mapping[str, Any], want: Mapping[str, Any], names=("file has", "asked for"), keys=None) -> list[str]:
    """'field: <names[0]> X, <names[1]> Y' for every field (of ``keys``, default both
    sides') whose values differ; a field one side lacks shows as None (made by an ekx from
    before the field existed). The source videos compare by video (`videos_differ`), and
    their frame classes only where both sides recorded them."""
    keys = sorted(set(have) | set(want)) if keys is None else sorted(keys)
    out = []
    for k in keys:
        a, b = have.get(k), want.get(k)
        field = k.rsplit(".", 1)[-1]  # a fused split's part1.source_videos too
        if field == VIDEOS:
            differ = videos_differ(a, b)
            if differ:
                more = f" (and {len(differ) - 1} more videos)" if len(differ) > 1 else ""
                out.append(f"{k}: {names[0]} {differ[0][0]!r}, {names[1]} {differ[0][1]!r}{more}")
        elif field == FRAMES and (_plain(a) in (None, NOT_RECORDED) or _plain(b) in (None, NOT_RECORDED)):
            continue  # a cache made before they were recorded: nothing to compare (it was never checked)
        elif not _same(a, b):
            out.append(f"{k}: {names[0]} {a!r}, {names[1]} {b!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)


def describe(bad: list[str], limit: int = 6) -> str:
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return "; ".join(bad[:limit]) + more


def input_attrs(bb, source_attrs: Mapping[str, str], video_input: str, decode_size: str) -> dict[str, Any]:
    """How decoded frames become this backbone's inputs: the backbone, the weights' own
    preprocessing, the frame source and decoder, which resize made the input size (and
    at what size the frames were decoded), and which video files were read."""
    from ekx.extract import video

    return {
        "backbone": bb.name,
        "clip_len": bb.clip_len,
        "sampling": video.sampling_rule(),
        **bb.preprocess.to_attrs(),
        **bb.attrs,  # a family's model: family, library version, pooling
        **{k: v for k, v in source_attrs.items()},
        "decode_size": decode_size,
        "video_input": video_input,
    }


def decode_size_of(bb, others: list, resize: str) -> str:
    """At what size this backbone's frames were decoded when one decode serves ``others``
    too (the largest size wins). Judged on EPIC's 1920x1080 frames, landscape and portrait:
    where another backbone's larger size wins, this backbone's features come from frames
    torchvision resized down from that size, not from the decoder's scaler."""
    if resize != "decoder":
        return FULL_FRAMES
    refs = ((1080, 1920), (1920, 1080))

    def area(b, h: int, w: int) -> int:
        dh, dw = b.preprocess.decode_size(h, w)
        return dh * dw

    if all(area(o, h, w) <= area(bb, h, w) for o in others for h, w in refs):
        return OWN_SIZE
    winner = max(others, key=lambda o: area(o, *refs[0]))
    return (
        f"decoder's scaler to {winner.name}'s resize size {list(winner.preprocess.resize_size)} "
        "(one decode for several backbones), then torchvision's resize to this backbone's"
    )


# ---------------------------------------------------------------- the source videos
#
# Each video read is recorded ("P01_01 1920x1080 59.9401 fps 12345678 bytes"): two caches that
# both read a video must have read the same file (a re-encoded copy differs in size, and
# mostly in resolution or rate). Train and validation hold different videos, so what they must
# share is a class: the detail at which each video's frames reached the backbone's resize
# size - scaled down from a larger frame (EPIC's 1920x1080 and 1280x720 alike), or scaled up
# from a smaller one, named by its size. A validation set read from 96x72 copies of videos whose
# training set was read from the originals then differs in class, while EPIC's own mix does not.

VIDEOS = "source_videos"  # identity: one record per video, compared by video (`videos_differ`)
FRAMES = "source_frames"  # identity: the sorted classes of the videos' frames (`frame_class`)
NOT_RECORDED = "not recorded (made before ekx recorded its source videos)"
SCALED_DOWN = "at or above the backbone's resize size (scaled down)"
DEFAULTS[FRAMES] = NOT_RECORDED
DEFAULTS[VIDEOS] = []


def video_record(video_id: str, width: int, height: int, fps: float, size: int) -> str:
    return f"{video_id} {width}x{height} {fps:.6g} fps {size} bytes"


def probe(video_id: str, path: Path, reader: Callable[[Path], tuple[int, int, float]] | None = None) -> str:
    """One video's record from its container's header (no frame decoded), or from ``reader``
    (width, height, fps) for a source of other files (JPEG frames: a folder has no size, -1)."""
    size = path.stat().st_size if path.is_file() else -1
    try:
        if reader is not None:
            return video_record(video_id, *reader(path), size)
        import av

        with av.open(str(path)) as c:
            v = c.streams.video[0]
            fps = float(v.average_rate or v.guessed_rate or 0)
            return video_record(video_id, v.codec_context.width, v.codec_context.height, fps, size)
    except Exception:  # its segments fail with the decoder's own reason; the record says so
        return f"{video_id}{_UNREADABLE}{size} bytes"


def records(source, paths: Mapping[str, Path]) -> list[str]:
    """The records of the videos ``paths`` (id -> file) as frame ``source`` reads them: video
    files from their headers, JPEG frames from each video's first frame."""
    if source.reads == "videos":
        return [probe(v, p) for v, p in paths.items()]

    def first_frame(path: Path) -> tuple[int, int, float]:
        r = source.open(path)
        try:
            h, w = r.get(np.array([0])).shape[1:3]
            return int(w), int(h), float(r.fps)
        finally:
            r.close()

    return [probe(v, p, first_frame) for v, p in paths.items()]


def frame_class(record: str, bb) -> str | None:
    """The class of a video's frames for backbone ``bb`` (None: unreadable)."""
    size = record.split(" ")[1]
    if "x" not in size:
        return None
    w, h = (int(x) for x in size.split("x"))
    dh, dw = bb.preprocess.decode_size(h, w)
    return SCALED_DOWN if h >= dh and w >= dw else f"{w}x{h}, scaled up to the backbone's resize size"


def source_attrs(records: list[str], bb) -> dict[str, Any]:
    """The identity fields of the videos a cache reads, for backbone ``bb``."""
    classes = {frame_class(r, bb) for r in records} - {None}
    return {VIDEOS: sorted(records), FRAMES: sorted(c for c in classes if c is not None)}


def videos_differ(a: Any, b: Any) -> list[tuple[str, str]]:
    """(record here, record there) of each video both record differently. A video unreadable
    on one side gave that side no features (its segments failed), so it mixes nothing: a
    broken download restored and resumed is redone, not refused."""
    mine = {r.split(" ", 1)[0]: r for r in _plain(a) or []}
    theirs = {r.split(" ", 1)[0]: r for r in _plain(b) or []}
    return [
        (mine[v], theirs[v])
        for v in sorted(mine.keys() & theirs.keys())
        if mine[v] != theirs[v] and _UNREADABLE not in mine[v] and _UNREADABLE not in theirs[v]
    ]


_UNREADABLE = " unreadable "


# ---------------------------------------------------------------- the commands' options
#
# Every option of `ekx extract` and `ekx import` is recorded in what it writes - under its own
# name, as ``import_<name>`` (the import flags), or as the attribute named in STORED_AS -
# unless it is in NOT_STORED, with the reason it cannot change what a stored feature means.
# tests/test_identity.py reads the commands' options and holds every one to this.

STORED_AS = {
    "frames": "frames_per_segment",
    "dense": "dense_rate",
    "dense_margin": "dense_span",  # "the split's segments +- M s"
    "annotations": "annotation_sha256",
    "videos": VIDEOS,  # each video read
    "frames_root": VIDEOS,  # the JPEG frames read, per video
    "fmt": "imported_format",
    "src": "source_sha256",
    "name": "backbone",  # imported:NAME
    "rate": "dense_rate",
    "times": "source_sha256",  # tim's interval table is hashed with the features
    "config": "import_stride",  # actionformer's YAML: its stride, frames and fps are import_*
}
NOT_STORED = {
    "workers": "how many processes decode: the same frames either way",
    "batch_size": "inputs per forward pass: each segment runs in passes of its own (float rounding at most)",
    "limit": "which segments: the rows themselves say (narration_id), and a resume checks the list",
    "out": "where the file is written",
    "features": "where the files are written",
    "recalibrate": "what to do when the calibration differs: the calibration used is bn_calibration",
    "skip_errors": "the exit code when segments failed: they are marked failed either way",
    "decode_timeout": "when a stuck decoder is killed: its segments fail, no feature changes",
}
