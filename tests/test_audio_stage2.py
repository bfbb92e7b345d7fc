"""Sound beside sight in stage 2 (issue 33): a visual and an audio cache fused with `+`
(other K and views aligned by time and view), the context head with an audio store as its
own token stream, TIM's audio arrays imported as its loader reads them, and `ekx predict` /
`ekx live` refusing a run on features of sound."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dense import N, V, annotations
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cache import store
from ekx.cache.imports import import_features
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.heads import context
from ekx.heads import data as heads_data
from ekx.heads.data import load_split
from ekx.predict import load_run

AUDIO = "audio"  # ekx.heads.data.AUDIO: what `modality` says of features of sound
AUDIO_ATTRS = {"audio_rate": 24000, "audio_window_samples": 23975}
PAIR = (2, 3)  # two verbs that look alike: the frames say "2 or 3", the sound says which


def write_cache(path: Path, feats: np.ndarray, nids, verbs, nouns, backbone: str, split: str, **extra) -> Path:
    """A per-segment cache [N, V, K, D] through ekx's own writer, rows as given."""
    n, views, k, dim = feats.shape
    rows = store.Rows(list(nids), [x.rsplit("_", 1)[0] for x in nids], np.asarray(verbs), np.asarray(nouns),
                      np.arange(n))  # fmt: skip
    attrs = {
        "format": store.FORMAT, "format_version": store.VERSION, "backbone": backbone, "weights": "none",
        "feature_dim": dim, "frames_per_segment": k, "views": views, "num_verbs": V, "num_nouns": N,
        "verb_classes": [f"c{i}" for i in range(V)], "noun_classes": [f"c{i}" for i in range(N)],
        "split": split, "bn_calibration": "", **extra,
    }  # fmt: skip
    store.create(path, attrs, rows, views, k, dim)
    w = store.Writer(path)
    w.write([(i, feats[i].astype(np.float16), np.arange(k)) for i in range(n)], [])
    w.close()
    return path


def test_caches_of_other_k_and_views_fuse_aligned_by_time_and_view(tmp_path):
    """Frames K = 8 x 2 views beside sound K = 3 x 1 view (rows in another order): the fused
    split has K = 8 and 2 views; each fused position holds the frame there and the sound
    window whose equal part of the segment holds that time; both views hear the clean sound."""
    n = 6
    nids = [f"P01_01_{i}" for i in range(n)]
    verbs, nouns = np.arange(n) % V, np.arange(n) % N
    # a feature says (segment, position, view): frames' positions are 0..7, sound's 0..2
    vis = np.stack(np.meshgrid(np.arange(n), np.arange(2), np.arange(8), indexing="ij"), -1).astype(np.float32)
    aud = np.stack(np.meshgrid(np.arange(n), np.arange(1), np.arange(3), indexing="ij"), -1).astype(np.float32)
    order = [3, 0, 5, 1, 4, 2]
    a = write_cache(tmp_path / "rgb.h5", vis, nids, verbs, nouns, "resnet50", "train")
    b = write_cache(tmp_path / "snd.h5", aud[order], [nids[i] for i in order], verbs[order], nouns[order],
                    "audio:auditory_slowfast", "train", **AUDIO_ATTRS)  # fmt: skip
    for first, second, ch in ((a, b, (slice(0, 3), slice(3, 6))), (b, a, (slice(3, 6), slice(0, 3)))):
        split = load_split(Path(f"{first}+{second}"), torch.device("cpu"))
        assert split.feats.shape == (n, 2, 8, 6) and split.k == 8 and split.views == 2
        ids = split.narration_id
        for r in range(n):
            seg = int(ids[r].rsplit("_", 1)[1])
            for v in range(2):
                for j in range(8):
                    frame = split.feats[r, v, j, ch[0]].tolist()
                    sound = split.feats[r, v, j, ch[1]].tolist()
                    assert frame == [seg, v, j]
                    # the sound window whose third of the segment holds the frame's time (j + 0.5) / 8
                    want = int((j + 0.5) / 8 * 3)
                    assert sound == [seg, 0, want], (r, v, j, sound)
    from ekx.heads.fusion import time_map  # (inside: each test of this file fails on its own before it existed)

    assert time_map(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and time_map(8, 8).tolist() == list(range(8))
    assert [heads_data.modality(open_cache(p).attrs) for p in (a, b)] == ["visual", AUDIO]


# ---------------------------------------------------------------- a task that needs sound


def pair_caches(root: Path) -> Path:
    """Per-segment caches of a task the frames cannot solve alone: verbs 2 and 3 give the
    same frame features, the sound tells them apart (and says nothing else)."""
    rng = np.random.default_rng(0)
    for split, seed in (("train", 1), ("validation", 2)):
        n = 96
        verbs = np.random.default_rng(seed).integers(V, size=n)
        nouns = np.random.default_rng(seed + 10).integers(N, size=n)
        nids = [f"P0{1 + i % 3}_0{1 + i % 2}_{i}" for i in range(n)]
        vis = rng.normal(size=(n, 2, 8, 12)).astype(np.float32)
        seen = np.where(verbs == PAIR[1], PAIR[0], verbs)
        vis[np.arange(n), :, :, seen] += 3.0
        vis[np.arange(n), :, :, V + nouns] += 3.0
        aud = rng.normal(size=(n, 1, 4, 6)).astype(np.float32)
        aud[:, :, :, 0] += 3.0 * (verbs == PAIR[0])[:, None, None]
        aud[:, :, :, 1] += 3.0 * (verbs == PAIR[1])[:, None, None]
        write_cache(root / "resnet50" / f"{split}.h5", vis, nids, verbs, nouns, "resnet50", split)
        write_cache(root / "audio:auditory_slowfast" / f"{split}.h5", aud, nids, verbs, nouns,
                    "audio:auditory_slowfast", split, **AUDIO_ATTRS)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    feats = pair_caches(root / "features")
    runs = root / "runs"
    for name, backbone in (("rgb", "resnet50"), ("av", "resnet50+audio:auditory_slowfast")):
        r = CliRunner().invoke(
            app, ["train-head", "pooling", "--backbone", backbone, "--name", name, "--features", str(feats),
                  "--runs", str(runs), "--epochs", "8", "--batch-size", "16", "--lr", "3e-2", "--device", "cpu",
                  "--seed", "0"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
    return feats, runs


def pair_accuracy(run: Path, features: str, tmp_path: Path) -> tuple[float, float]:
    """Verb top-1 on the look-alike pair and on the other verbs, from the run's submission."""
    sub = tmp_path / f"{run.name}.json"
    r = CliRunner().invoke(app, ["evaluate", str(run), "--features", features, "--device", "cpu",
                                 "--submission", str(sub)])  # fmt: skip
    assert r.exit_code == 0, r.output
    scores = json.loads(sub.read_text())["results"]
    c = open_cache(Path(features.split("+")[0]))
    truth = dict(zip(c.narration_id, c.verb_class.tolist(), strict=True))
    hit = {True: [], False: []}
    for nid, s in scores.items():
        best = max(s["verb"], key=lambda k: s["verb"][k])
        hit[truth[nid] in PAIR].append(int(best) == truth[nid])
    return float(np.mean(hit[True])), float(np.mean(hit[False]))


def test_frames_and_sound_fused_tell_apart_what_frames_alone_cannot(pair_runs, tmp_path):
    """`--backbone resnet50+audio:auditory_slowfast` trains and evaluates (K 8 + 4, views 2 +
    1, aligned); it tells the look-alike pair apart where the frames alone guess, and matches
    them on the other verbs. The run keeps both parts' identities, the sound's as sound."""
    feats, runs = pair_runs
    val = f"{feats}/resnet50/validation.h5"
    fused = f"{val}+{feats}/audio:auditory_slowfast/validation.h5"
    rgb_pair, rgb_rest = pair_accuracy(runs / "rgb", val, tmp_path)
    av_pair, av_rest = pair_accuracy(runs / "av", fused, tmp_path)
    assert rgb_pair < 0.75 and av_pair > 0.9, (rgb_pair, av_pair)  # guessing vs hearing
    assert av_rest >= rgb_rest - 0.1 and rgb_rest > 0.8, (rgb_rest, av_rest)
    ckpt = torch.load(runs / "av" / "best.pt", weights_only=True)
    assert ckpt["head_kwargs"]["dim"] == 18 and ckpt["head_kwargs"]["frames"] <= 8
    assert ckpt["cache"]["part2.backbone"] == "audio:auditory_slowfast" and ckpt["cache"]["part2.audio_rate"] == 24000


def test_predict_and_live_refuse_a_run_on_sound(pair_runs, tmp_path):
    """A run whose features include sound cannot be fed from frames: refused before any
    video is read, naming the sound part and the way out."""
    _, runs = pair_runs
    with pytest.raises(EkxError, match=r"features of sound \(audio:auditory_slowfast\); ekx predict and ekx live"):
        load_run(runs / "av", "cpu")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    for cmd in (["predict", str(video), "--run", str(runs / "av")],
                ["live", "--run", str(runs / "av"), "--video", str(video), "--headless"]):  # fmt: skip
        r = CliRunner().invoke(app, [*cmd, "--device", "cpu"], terminal_width=300)
        assert r.exit_code == 1 and "features of sound" in r.output and "without the audio part" in r.output, r.output


# ---------------------------------------------------------------- TIM's audio features


def tim_table(path: Path, lengths: dict[str, float], interval: float = 1.1, hop: float = 0.2) -> list[dict]:
    """A feature-interval table as TIM's make_framepickle.py writes it (its columns; a
    ``interval`` s window every ``hop`` s while it fits), rows shuffled in the file; the last
    interval of each video cut short (shorter than a clip of sound)."""
    rows = []
    for vid, length in lengths.items():
        start, index = 0.0, 1
        while start + interval < length:
            stop = start + interval if start + interval + hop < length else start + 0.6
            rows.append({"narration_id": f"{vid}_{index}", "video_id": vid, "start_sec": f"{start:.2f}",
                         "stop_sec": f"{stop:.2f}", "narration_sec": f"{start + interval / 2:.2f}",
                         "start_frame": round(start * 60), "stop_frame": round(stop * 60)})  # fmt: skip
            start, index = start + hop, index + 1
    np.random.default_rng(0).shuffle(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def tim_make_npyfiles(features: np.ndarray, rows: list[dict], out: Path) -> None:
    """TIM's feature_extractors/auditory_slowfast/utils/make_npyfiles.py without pandas: the
    extractor's features.npy (NUM_FEATURES rows per interval, in the table's order) grouped
    per video under '{video}_{index:06d}', sorted, stacked [N, views, D]."""
    clips = len(features) // len(rows)
    per: dict[str, dict[str, list]] = {}
    for i in range(len(features)):
        r = rows[i // clips]
        key = "{}_{:06d}".format(r["video_id"], int(r["narration_id"].split("_")[-1]))
        per.setdefault(r["video_id"], {}).setdefault(key, []).append(features[i])
    out.mkdir(parents=True)
    for vid, v in per.items():
        a = np.stack([np.stack(v[k], axis=0) for k in sorted(v)], axis=0)
        np.save(out / f"{vid}.npy", np.squeeze(a, axis=1) if a.ndim == 4 else a)


def tim_load_feats(rows: list[dict], v_id: str) -> np.ndarray:
    """TIM's recognition/.../sliding_window.load_feats for one video's times: its rows sorted
    by start_sec, video_id and narration_sec dropped, [:, :2] = (start_sec, stop_sec)."""
    mine = sorted((r for r in rows if r["video_id"] == v_id), key=lambda r: float(r["start_sec"]))
    return np.array([[float(r["start_sec"]), float(r["stop_sec"])] for r in mine])


def tim_sound_window(start: float, stop: float, sr: int = 24000, clip_secs: float = 0.999) -> tuple[int, int]:
    """The samples TIM's Auditory SlowFast reads for an interval's clean view (clip index 0):
    audio_loader_epic.get_start_end_idx and _extract_sound_feature, [first, end)."""
    a, b = round(start * sr), round(stop * sr)  # their int(round(...))
    clip = round(sr * clip_secs)
    if b - a < clip:
        return a, b  # the whole interval, padded
    delta = max(b - a - clip, 0)
    first = a + np.linspace(0, delta, num=3)[0]
    return int(first), int(first + clip - 1)


def test_tim_audio_arrays_are_read_as_its_loader_reads_them(tmp_path):
    """TIM's audio features, written as its extraction and make_npyfiles.py write them
    ([N, 3 views, 2304] per video, a 1.1 s / 0.2 s interval table in any row order): ekx's store
    holds row i of each video at TIM's i-th interval by start (load_feats), every view, at
    the centre of the sound its clean view was computed from (1 s from the interval's start;
    the whole interval where shorter), marked as sound."""
    table = tmp_path / "EPIC_Sounds_train_audio_feature_intervals.csv"
    rows = tim_table(table, {"P01_01": 9.0, "P02_03": 5.0})
    clips, dim = 3, 2304
    rng = np.random.default_rng(1)
    features = rng.normal(size=(len(rows) * clips, dim)).astype(np.float32)
    features[:, 0] = [float(rows[i // clips]["start_sec"]) for i in range(len(features))]  # which interval
    features[:, 1] = np.arange(len(features)) % clips  # which view
    tim_make_npyfiles(features, rows, tmp_path / "train")
    ann = annotations(tmp_path / "ann", [("P01_01", 2.0, 4.0, 0, 0), ("P02_03", 1.0, 2.0, 1, 1)])
    out = tmp_path / "asf.h5"
    import_features("tim-audio", tmp_path / "train", ann, "train", out, "asf-epic-sounds", times=table)
    c = open_cache(out)
    assert heads_data.modality(c.attrs) == AUDIO and c.attrs["views"] == clips
    assert "SpecAugment" in c.attrs["augmentation"]
    f = c.features()
    for vid in ("P01_01", "P02_03"):
        mine = [i for i, v in enumerate(c.video_id) if v == vid]
        ok = np.isfinite(c.time[mine])
        got = f[mine].transpose(0, 2, 1, 3)[ok]  # [positions, views, D]
        times = c.time[mine][ok]
        want = np.load(tmp_path / "train" / f"{vid}.npy")
        intervals = tim_load_feats(rows, vid)
        assert np.array_equal(got, want.astype(np.float16))  # every view, rows in TIM's order
        assert np.allclose(got[:, 0, 0], intervals[:, 0], atol=5e-3)  # row i at its own interval
        centre = np.array([sum(tim_sound_window(a, b)) / 2 / 24000 for a, b in intervals])
        assert np.abs(times - centre).max() < 1e-3, np.abs(times - centre).max()
        assert (intervals[:, 1] - intervals[:, 0] < 0.999).any()  # the short interval was read too
    split = load_split(out, torch.device("cpu"))
    assert split.views == clips and heads_data.modality(split.attrs) == AUDIO


# ---------------------------------------------------------------- the context head


def av_stores(root: Path) -> tuple[dict[str, str], Path]:
    """Per split, a frames store (npy-dir, 4/s, one view) and a sound store (tim-audio, 1 s
    every 0.5 s, 3 views) joined with `+`: the frames mark the noun and the verb with the
    look-alike pair merged, the sound marks which of the pair; sound view v adds v / 2 to
    its last channel (so a test can tell the views apart)."""
    rng = np.random.default_rng(0)
    segs: dict[str, list] = {"train": [], "validation": []}
    for split, vids in (("train", ["P01_01", "P02_01"]), ("validation", ["P03_01"])):
        for vid in vids:
            t = 1.0
            for i in range(12):
                b = t + float(rng.uniform(1, 3))
                segs[split].append((vid, round(t, 2), round(b, 2), i % V, (i * 5) % N))
                t = b + 1.0
    ann = annotations(root / "ann", segs["train"], segs["validation"])
    out = {}
    for split, marks in segs.items():
        vis_dir, snd_dir = root / f"rgb-{split}", root / f"snd-{split}" / split
        vis_dir.mkdir()
        snd_dir.mkdir(parents=True)
        table = root / f"snd-{split}.csv"
        rows = []
        for vid in dict.fromkeys(m[0] for m in marks):
            t = (np.arange(240) + 0.5) / 4
            x = rng.normal(size=(240, 12)).astype(np.float32)
            starts = np.arange(119) * 0.5
            y = np.repeat(rng.normal(size=(119, 1, 6)), 3, axis=1).astype(np.float32)
            y[:, :, 5] += np.arange(3) / 2
            for v, a, b, verb, noun in marks:
                if v == vid:
                    inside = (t >= a) & (t < b)
                    x[inside, verb if verb != PAIR[1] else PAIR[0]] += 3
                    x[inside, V + noun % 8] += 3
                    y[(starts + 0.5 >= a) & (starts + 0.5 < b), :, int(verb == PAIR[1])] += 3 * (verb in PAIR)
            np.save(vis_dir / f"{vid}.npy", x)
            np.save(snd_dir / f"{vid}.npy", y)
            rows += [{"video_id": vid, "start_sec": f"{a:.2f}", "stop_sec": f"{a + 1:.2f}"} for a in starts]
        with open(table, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        import_features("npy-dir", vis_dir, ann, split, root / f"{split}.rgb.h5", "marks", rate=4.0)
        import_features("tim-audio", snd_dir, ann, split, root / f"{split}.snd.h5", "asf", times=table)
        out[split] = f"{root / f'{split}.rgb.h5'}+{root / f'{split}.snd.h5'}"
    return out, ann


def test_the_context_head_reads_sound_as_its_own_stream_and_trains(tmp_path):
    """Frames (1 view, 4/s) + sound (3 views, 2/s): two token streams, each at its own nearest
    times; window view 2 reads the sound's view 2 and the frames' only view; the head's
    stream embedding has a row per stream; it trains, evaluates and keeps the sound part's
    identity as sound."""
    stores, ann = av_stores(tmp_path)
    split = load_split(Path(stores["train"]), torch.device("cpu"))
    assert split.streams is not None and [s.feats.shape[1] for s in split.streams] == [1, 3]
    idx = split.rows[:4]
    zero, one = torch.zeros(18), torch.ones(18)
    x = {v: context.windows(split, idx, 8.0, None, torch.full((4, 1), v), zero, one, "cpu") for v in (0, 2)}
    tok = context.TOKENS
    frames, sound = slice(0, tok), slice(tok, 2 * tok)
    assert torch.equal(x[0][:, frames, :12], x[2][:, frames, :12])  # one view of frames: read for both
    ok = x[0][:, sound, -3] > 0.5
    assert ok.any() and (x[0][:, sound, :12] == 0).all() and (x[0][:, frames, 12:18] == 0).all()
    assert torch.allclose((x[2][:, sound, 17] - x[0][:, sound, 17])[ok], torch.tensor(1.0), atol=1e-2)
    runs = tmp_path / "runs"
    r = CliRunner().invoke(
        app, ["train-head", "context", "--train-features", stores["train"], "--val-features", stores["validation"],
              "--runs", str(runs), "--device", "cpu", "--window", "8", "--layers", "1", "--width", "32",
              "--epochs", "2", "--name", "av", "--annotations", str(ann)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ckpt = torch.load(runs / "av" / "best.pt", weights_only=True)
    assert ckpt["head_kwargs"]["streams"] == 2 and ckpt["head_kwargs"]["dim"] == 18 + context.EXTRA
    assert ckpt["cache"]["part2.modality"] == AUDIO and ckpt["cache"]["part2.imported_format"] == "tim-audio"
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["evaluate", str(runs / "av"), "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["segments"] == 12 and got["missing"] == 0 and "verb_top1" in got["metrics"]
    with pytest.raises(EkxError, match=r"features of sound \(imported:asf\)"):
        load_run(runs / "av", "cpu")
