from __future__ import annotations

import csv
from collections import Counter

import decord
import numpy as np

from ekx import epic
from ekx.synth import (
    NOUNS,
    REVERSED_PAIRS,
    VERBS,
    SynthConfig,
    allowed_nouns,
    plan,
    read_stamp,
    synthesize,
)


def _video_info(root):
    with open(root / "annotations" / "EPIC_100_video_info.csv") as fh:
        return {r["video_id"]: r for r in csv.DictReader(fh)}


def test_loader_reads_synth_back(synth_data):
    ann = epic.Annotations(synth_data / "annotations")
    train, val, test = ann.segments("train"), ann.segments("validation"), ann.segments("test")
    assert len(train) + len(val) == 4 * 6 and train and val
    assert len(test) == len(val) and all(s.verb_class == -1 for s in test)
    assert {s.video_id for s in train}.isdisjoint({s.video_id for s in val})
    assert len(ann.verbs()) == len(VERBS) and len(ann.nouns()) == len(NOUNS)
    assert ann.unseen_participants("validation") <= {s.participant_id for s in val}
    assert all(0.5 <= s.duration <= 6.0 for s in train + val)
    found, missing = epic.locate_videos(train + val, synth_data / "videos")
    assert not missing and len(found) == 4


def test_decord_sees_declared_frames_and_fps(synth_data):
    info = _video_info(synth_data)
    found = epic.index_videos(synth_data / "videos")
    assert {int(r["fps"]) for r in info.values()} == {30, 60}
    for vid, row in info.items():
        vr = decord.VideoReader(str(found[vid]))
        assert vr.get_avg_fps() == float(row["fps"])
        assert len(vr) == round(float(row["duration"]) * float(row["fps"]))
        w, h = map(int, row["resolution"].split("x"))
        idx = [0, 1, len(vr) // 3, len(vr) - 1]
        frames = vr.get_batch(idx).asnumpy()
        assert frames.shape == (4, h, w, 3)
        assert [read_stamp(f) for f in frames] == idx


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    cfg = SynthConfig(videos=2, segments=2, width=64, height=64, seed=5, workers=1)
    a, b = synthesize(tmp_path / "a", cfg), synthesize(tmp_path / "b", cfg)
    for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv"):
        assert (a["annotations"] / name).read_bytes() == (b["annotations"] / name).read_bytes()
    va = epic.index_videos(a["video_root"])
    vb = epic.index_videos(b["video_root"])
    assert all(va[k].read_bytes() == vb[k].read_bytes() for k in va)
    cfg.seed = 6
    assert plan(cfg)[0].segments[0] != plan(SynthConfig(videos=2, segments=2, seed=5))[0].segments[0]


def test_label_structure_makes_order_the_only_cue_within_a_pair():
    mask = allowed_nouns(0)
    for a, b in REVERSED_PAIRS:
        assert (mask[VERBS.index(a)] == mask[VERBS.index(b)]).all()
    assert not mask.all(), "co-occurrence must be structured, not every pair"
    videos = plan(SynthConfig(seed=0))
    pairs = Counter((s.verb, s.noun) for v in videos for s in v.segments)
    assert all(mask[v, n] for v, n in pairs)
    lengths = np.array([s.stop - s.start for v in videos for s in v.segments])
    assert lengths.min() >= 0.5 and lengths.max() <= 6.0 and lengths.std() > 1.0
    gaps = [b.start - a.stop for v in videos for a, b in zip(v.segments, v.segments[1:], strict=False)]
    assert min(gaps) > 0


def test_reversed_verbs_are_mirror_images_in_time(tmp_path):
    """open at progress p renders exactly like close at 1 - p (same for the other pairs)."""
    from ekx.synth import _state

    for a, b in REVERSED_PAIRS:
        for p in (0.1, 0.5, 0.9):
            assert np.allclose(_state(a, p)[:2], _state(b, 1 - p)[:2])
        assert _state(a, 0.05) != _state(a, 0.95)
