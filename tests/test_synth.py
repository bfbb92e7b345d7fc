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


# ---------------------------------------------------------------- sound (issue 33)


def _decode(path, what: str) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        if what == "video":
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def test_sound_track_follows_the_labels_and_changes_no_frame(tmp_path):
    """Each video carries a mono 48 kHz track (16-bit PCM in the MP4): loud inside segments,
    low noise between them; the frames are those of the same video without sound."""
    from ekx.synth import SOUND_RATE

    with_sound = synthesize(tmp_path / "s", SynthConfig(videos=2, segments=3, width=64, height=64, seed=2, workers=1))
    silent = synthesize(tmp_path / "n", SynthConfig(videos=2, segments=3, width=64, height=64, seed=2, workers=1,
                                                    sound=False))  # fmt: skip
    a, b = epic.index_videos(with_sound["video_root"]), epic.index_videos(silent["video_root"])
    vid = sorted(a)[0]
    np.testing.assert_array_equal(_decode(a[vid], "video"), _decode(b[vid], "video"))
    import av

    with av.open(str(b[vid])) as c:
        assert not c.streams.audio
    with av.open(str(a[vid])) as c:
        s = c.streams.audio[0]
        assert (s.codec_context.name, s.rate, s.codec_context.layout.nb_channels) == ("pcm_s16le", SOUND_RATE, 1)
    sound = _decode(a[vid], "audio").astype(np.float32) / 32768
    segs = [s for s in epic.Annotations(with_sound["annotations"]).segments("train") if s.video_id == vid]
    fps = float(_video_info(with_sound["annotations"].parent)[vid]["fps"])
    assert abs(len(sound) / SOUND_RATE - _decode(a[vid], "video").shape[0] / fps) < 0.05
    inside = np.zeros(len(sound), bool)
    for s in segs:
        inside[round(s.start * SOUND_RATE) : round(s.stop * SOUND_RATE)] = True
    rms_in, rms_out = np.sqrt((sound[inside] ** 2).mean()), np.sqrt((sound[~inside] ** 2).mean())
    assert rms_in > 0.05 and rms_out < 0.005


def test_audio_pair_looks_the_same_and_sounds_different():
    """pour and stir: the same frames for the same object, another sound; they share their
    nouns (like every pair) and are the "sound" category."""
    from ekx import synth

    cfg = SynthConfig(videos=2, segments=2, audio_pair=True)
    assert cfg.verbs[-2:] == synth.AUDIO_PAIR and len(cfg.verbs) == len(VERBS) + 2
    mask = allowed_nouns(0, cfg.verbs)
    assert (mask[-1] == mask[-2]).all()
    assert synth._category("pour") == synth._category("stir") == "sound"
    pour, stir = cfg.verbs.index("pour"), cfg.verbs.index("stir")
    frames, sounds = [], []
    for verb in (pour, stir):
        video = synth._Video("P01_01", "P01", 30, 3.0, 1, [synth._Segment("x", 0.5, 2.5, verb, 0)], cfg.verbs)
        bg = synth._background(64, 64)
        frames.append(np.stack([synth.render_frame(video, i, 64, 64, bg) for i in range(0, 90, 7)]))
        sounds.append(synth.render_sound(video, NOUNS))
    np.testing.assert_array_equal(frames[0], frames[1])
    spectra = [np.abs(np.fft.rfft(s[synth.SOUND_RATE : 2 * synth.SOUND_RATE])) for s in sounds]
    assert np.corrcoef(spectra[0], spectra[1])[0, 1] < 0.5
    # and a time-reversed pair sounds time-reversed (sound tells nothing the frames do not)
    p = np.linspace(0, 1, 4800)
    rng = np.random.default_rng(0)
    up, down = (synth.segment_sound(v, "circle:red", p, synth.SOUND_RATE, rng) for v in ("turn-on", "turn-off"))
    np.testing.assert_allclose(np.abs(up), np.abs(down[::-1]), atol=0.02)
