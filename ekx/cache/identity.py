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

from collections.abc import Mapping
from typing import Any

import numpy as np

# where and with which library versions a file was made, and descriptions of fields that
# are themselves in the identity: provenance, never meaning
PROVENANCE = frozenset(
    {
        "format_version",  # a newer format stores the same features (checksums, more datasets)
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
    before the field existed)."""
    keys = sorted(set(have) | set(want)) if keys is None else sorted(keys)
    return [
        f"{k}: {names[0]} {have.get(k)!r}, {names[1]} {want.get(k)!r}"
        for k in keys
        if not _same(have.get(k), want.get(k))
    ]


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
